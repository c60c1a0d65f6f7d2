"""Shared by the profile scripts under bench/profiles/: paths, trace aggregation, the small_cnn setup of the
per-label profile, and interleaved timing of compiled steps.

`add_repository_paths()` puts bench/ (for gain_overhead, step_time) and the repository (for gain_jax) on
sys.path.
Traces and dumps go to $PROFILE_DIR (default /tmp/profile_work).
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import statistics
import sys
import time
import types

PROFILES = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.dirname(PROFILES)
REPO = os.path.dirname(BENCH)

OUT = os.environ.get("PROFILE_DIR", "/tmp/profile_work")


def add_repository_paths() -> None:
    for path in (BENCH, REPO):
        if path not in sys.path:
            sys.path.insert(0, path)


def _is_runtime_event(name: str) -> bool:
    """Events of the runtime around the ops (executable launch, thunk executor), not ops themselves."""
    return name.startswith("$") or name.startswith("ThunkExecutor") or "PjRt" in name or "Execute" in name


def trace_file(directory: str) -> str:
    """The perfetto trace that `jax.profiler.trace(directory, create_perfetto_trace=True)` wrote."""
    return glob.glob(f"{directory}/**/*perfetto_trace.json.gz", recursive=True)[0]


def aggregate_trace(path: str, strip_suffix: bool = True, skip_runtime: bool = True):
    """(total microseconds, event count) per name of the complete ("X") events of a perfetto trace file or
    of the trace under a directory; `strip_suffix` drops HLO's ".N" so that e.g. all fusion.N add up."""
    if os.path.isdir(path):
        path = trace_file(path)
    with gzip.open(path) as handle:
        events = json.load(handle)
    events = events["traceEvents"] if isinstance(events, dict) else events
    total, count = collections.Counter(), collections.Counter()
    for event in events:
        if event.get("ph") != "X":
            continue
        name = event["name"]
        if skip_runtime and _is_runtime_event(name):
            continue
        if strip_suffix:
            name = re.sub(r"\.\d+$", "", name)
        total[name] += event.get("dur", 0)
        count[name] += 1
    return total, count


def cost_analysis(compiled):
    """(flops, bytes accessed) of a compiled XLA program (nan where not reported)."""
    add_repository_paths()
    from gain_overhead import xla_cost_analysis

    analysis = xla_cost_analysis(compiled)
    return analysis.get("flops", float("nan")), analysis.get("bytes accessed", float("nan"))


def small_cnn_setup(num_images: int = 32, image_size: int = 64, num_classes: int = 20):
    """The per-label profile's common setup: small_cnn, `num_images` normal images (rng seed 0; the rng is
    returned to draw labels from), the model's variables, Adam, and `fresh()` train states."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import gain_jax as gj

    rng = np.random.default_rng(0)
    model = gj.build_model("small_cnn", num_classes, dropout_rate=0.5)
    images = jnp.asarray(rng.normal(size=(num_images, image_size, image_size, 3)).astype(np.float32))
    variables = model.init(jax.random.PRNGKey(0), images[:1])
    tx = optax.adam(1e-4)

    def fresh():
        return gj.create_train_state(jax.tree_util.tree_map(jnp.copy, variables), tx)

    return types.SimpleNamespace(rng=rng, model=model, images=images, variables=variables, tx=tx, fresh=fresh,
                                 key0=jax.random.PRNGKey(0), on=jnp.float32(1.0))


def interleaved_step_times(programs: dict, states: dict, key, rounds: int = 4, steps_per_round: int = 4):
    """Seconds per step of each compiled train step in `programs` ({name: (compiled, batch, extra args)}),
    run in turn, `rounds` x `steps_per_round` each (the first of each round untimed), so that machine noise
    hits all alike. `states` ({name: train state}) is updated in place."""
    import jax

    times = {name: [] for name in programs}
    for _round in range(rounds):
        for name, (compiled, batch, extra) in programs.items():
            state = states[name]
            for i in range(steps_per_round):
                start = time.perf_counter()
                state, metrics = compiled(state, batch, key, *extra)
                jax.block_until_ready(metrics)
                if i:
                    times[name].append(time.perf_counter() - start)
            states[name] = state
    return times


def median_ms(seconds) -> float:
    return statistics.median(seconds) * 1e3
