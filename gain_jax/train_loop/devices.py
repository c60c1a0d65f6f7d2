"""Device placement: data parallelism over every device of every process, transfers ahead of the step,
and what the processes of a multi-host run must agree on.

The global batch is split over one `Mesh` axis ("batch") of all devices, the state replicated.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
from collections.abc import Iterable, Iterator, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gain_jax.evaluate import BATCH_KEYS


@dataclasses.dataclass(frozen=True)
class Placement:
    """Data parallelism: batches split over the "batch" axis of a mesh of all devices, state replicated."""

    mesh: Mesh
    batch_sharding: NamedSharding
    replicated: NamedSharding


def data_parallel_placement(devices=None) -> Placement:
    mesh = Mesh(np.asarray(devices if devices is not None else jax.devices()), ("batch",))
    return Placement(mesh, NamedSharding(mesh, PartitionSpec("batch")), NamedSharding(mesh, PartitionSpec()))


def batch_to_device(placement: Placement, batch: Mapping[str, np.ndarray], global_rows: bool = False) -> dict:
    """Host batch -> global arrays sharded over the batch axis. A training batch holds this process's rows;
    an evaluation batch (`global_rows`) holds every row, and each process gives its slice."""
    count, index = jax.process_count(), jax.process_index()
    device_batch = {}
    for key in BATCH_KEYS:
        rows = np.asarray(batch[key])
        if global_rows and count > 1:
            per_process = rows.shape[0] // count
            rows = rows[index * per_process:(index + 1) * per_process]
        device_batch[key] = jax.make_array_from_process_local_data(placement.batch_sharding, rows)
    if "packing" in batch:  # indices into the whole batch: every device holds all of them
        device_batch["packing"] = jax.device_put(batch["packing"], placement.replicated)
    return device_batch


def rows_to_host(array) -> np.ndarray:
    """All rows of a batch-sharded global array, on every process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415  (only multi-host runs need it)

        return np.asarray(multihost_utils.process_allgather(array, tiled=True))
    return np.asarray(array)


def prefetch_to_device(placement: Placement, batches: Iterable[Mapping[str, np.ndarray]],
                       depth: int = 2) -> Iterator[dict]:
    """`batches` as sharded device batches, `depth` of them transferred ahead: the next batch's transfer
    overlaps the current step (like flax.jax_utils.prefetch_to_device, for global arrays)."""
    queue: collections.deque = collections.deque()
    batches = iter(batches)

    def enqueue(count: int) -> None:
        for batch in itertools.islice(batches, count):
            queue.append(batch_to_device(placement, batch))

    enqueue(depth)
    while queue:
        yield queue.popleft()
        enqueue(1)


def first_process_with(flag: bool) -> int | None:
    """The index of the first process whose `flag` is set, None if none is: every process of a multi-host run
    gets the same answer (a collective, so every process must call it at the same point). One process: its
    own flag, no collective."""
    if jax.process_count() == 1:
        return 0 if flag else None
    from jax.experimental import multihost_utils  # noqa: PLC0415  (only multi-host runs need it)

    flags = np.asarray(multihost_utils.process_allgather(np.asarray(flag, np.int32))).reshape(-1)
    raised = np.flatnonzero(flags)
    return int(raised[0]) if raised.size else None


def agree_to_stop(stop) -> bool:
    """Whether any process's `StopRequest` is set; a process whose own is not takes the request too, so that
    every process of a multi-host run stops at the same step (one collective; none with one process)."""
    first = first_process_with(stop is not None and stop.requested)
    if first is None:
        return False
    if not stop.requested:
        stop.request(f"a stop on process {first}")
    return True
