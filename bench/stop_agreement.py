"""What the multi-host stop agreement costs (gain_jax.train_loop.devices.agree_to_stop): one process, where it
is a flag read (no collective), and two CPU processes on loopback, where it is one process_allgather of a flag
(the loop runs it every --log_every steps).

    python bench/stop_agreement.py            # prints both figures
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import timeit

CALLS_ONE_PROCESS = 100_000
CALLS_TWO_PROCESSES = 50


def one_process() -> None:
    from gain_jax.train_loop.devices import agree_to_stop
    from gain_jax.train_loop.stopping import StopRequest

    stop = StopRequest()
    agree_to_stop(stop)
    seconds = timeit.timeit(lambda: agree_to_stop(stop), number=CALLS_ONE_PROCESS) / CALLS_ONE_PROCESS
    print(f"one process: {seconds * 1e6:.2f} us per call (mean of {CALLS_ONE_PROCESS} calls)", flush=True)


def two_processes_worker(port: int, process_id: int) -> None:
    import jax

    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    from gain_jax.train_loop.devices import agree_to_stop
    from gain_jax.train_loop.stopping import StopRequest

    stop = StopRequest()
    agree_to_stop(stop)  # the first one compiles
    seconds = timeit.timeit(lambda: agree_to_stop(stop), number=CALLS_TWO_PROCESSES) / CALLS_TWO_PROCESSES
    if process_id == 0:
        print(f"two CPU processes on loopback: {seconds * 1e3:.2f} ms per call (mean of {CALLS_TWO_PROCESSES} "
              f"calls)", flush=True)


def main() -> None:
    if len(sys.argv) == 3:
        two_processes_worker(int(sys.argv[1]), int(sys.argv[2]))
        return
    one_process()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    workers = [subprocess.Popen([sys.executable, __file__, str(port), str(index)], env=env) for index in (0, 1)]
    for worker in workers:
        worker.wait(timeout=300)


if __name__ == "__main__":
    main()
