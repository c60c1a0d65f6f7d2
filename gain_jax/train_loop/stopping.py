"""Stopping a run: the one signal policy of the loop and of train.py.

Imports neither JAX nor TensorFlow (nor `gain_jax.config`, which imports JAX), so that train.py installs
these handlers before the heavy imports: a Ctrl-C while the libraries load never raises inside them.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

EXIT_STATUS = 130  # a run stopped by a signal (train.py's exit status too)


class StopRequest:
    """A flag the loop checks between steps (and the start-up at safe points), so the state is never
    caught mid-update (the train step donates its input state) and no exception is raised inside native
    code. As a signal handler: the first signal sets the flag, a second one says the run is stopping, a
    third one ends the process at once (exit 130), except inside `protect()` (a checkpoint being
    written), which the process never leaves half-done."""

    EXIT_STATUS = EXIT_STATUS

    def __init__(self, signals_before: int = 0, signal_name: str | None = None):
        self.signal_name: str | None = signal_name
        self.count = signals_before  # signals received (those before the handler was installed included)
        self._protected = 0
        self.training = False  # set once the run writes its folder (a stop then saves a checkpoint)

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def request(self, reason: str = "request") -> None:
        """Ask the run to save and stop at the next step boundary (from any thread)."""
        self.signal_name = self.signal_name or reason

    @property
    def protected(self) -> bool:
        return self._protected > 0

    def __call__(self, signum, frame):
        name = signal.Signals(signum).name
        self.count += 1
        if self.signal_name is None:
            self.signal_name = name
            if self.training:
                say(f"{name}: stopping at the next step boundary (a checkpoint is saved there first); "
                    f"a third signal quits at once without saving")
            else:
                say(f"{name}: stopping at the next safe point of the start-up, before anything is written")
        elif self._protected:
            say(f"{name}: writing a checkpoint; stopping once it is complete")
        elif self.count < 3:
            say(f"{name}: already stopping, at the next step boundary; a third signal quits at once without "
                f"saving")
        else:
            lost = ("the checkpoints already written are complete, the steps since the newest one are lost"
                    if self.training else "nothing written")
            say(f"{name} a third time: quitting at once; {lost}")
            os._exit(self.EXIT_STATUS)  # no exception unwinding through native code

    @contextlib.contextmanager
    def protect(self):
        """Signals inside the block never end the process: the block completes, then the run stops at the
        next step boundary (the flag is set)."""
        self._protected += 1
        try:
            yield
        finally:
            self._protected -= 1


def say(message: str) -> None:
    """One line on stderr, never an exception (a closed or broken stderr must not turn a signal into a
    traceback)."""
    try:
        print(message, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def check_stop(stop: StopRequest | None, where: str, manager=None) -> None:
    """At a safe point of the start-up: raise RunInterrupted when a stop was requested."""
    if stop is None or stop.signal_name is None:
        return
    from gain_jax.config import RunInterrupted  # noqa: PLC0415  (imports JAX, loaded by then)

    message = f"interrupted by {stop.signal_name} {where}, before training: nothing written"
    if manager is not None and manager.latest_step() is not None:
        message += f"; the run's checkpoints are unchanged (newest: step {manager.latest_step()})"
    raise RunInterrupted(message)


def install_handlers(stop: StopRequest) -> dict:
    """SIGINT and SIGTERM go to `stop` (main thread only; elsewhere nothing changes); returns the previous
    handlers, for the caller to restore."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}


@contextlib.contextmanager
def handle_signals(stop: StopRequest):
    """SIGINT and SIGTERM go to `stop` inside the block (`install_handlers`), restored afterwards."""
    previous = install_handlers(stop)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
