import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # bench/profiles
import profile_common as pc

pc.add_repository_paths()  # bench/ and the repository
import gain_overhead as go  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import gain_jax as gj  # noqa: E402

B, S, C = 32, 64, 20
STEPS = int(os.environ.get("STEPS", 10))
setup = pc.small_cnn_setup(3 * B, S, C)
rng, model, images_all, fresh, key0, on = setup.rng, setup.model, setup.images, setup.fresh, setup.key0, setup.on
images = images_all[:B]
fixed = {k: go.labels_with(k, B, C, rng) for k in (2, 3)}


def timeit(fn, *args, steps=STEPS, warm=2, state_first=False):
    ts = []
    for i in range(warm + steps):
        t = time.perf_counter()
        out = fn(*args)
        jax.block_until_ready(out)
        if state_first:
            args = (out[0],) + args[1:]
        if i >= warm:
            ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


rows = []


def rec(name, ms, fl=None, by=None):
    rows.append((name, ms, fl, by))
    print(f"{name:<44} {ms:8.2f} ms  flops {(fl or 0) / 1e9:.3f} G  bytes {(by or 0) / 1e6:.1f} MB", flush=True)


# full steps
def cls_step(n):
    st = fresh()
    batch = {"image": images_all[:n], "labels": jnp.asarray(go.labels_with(2, n, C, rng))}
    c = go.make_classification_step(model).lower(st, batch, key0).compile()
    return c, st, batch


for n in (B, 2 * B, 3 * B):
    c, st, batch = cls_step(n)
    fl, by = pc.cost_analysis(c)
    rec(f"cls step B={n}", timeit(c, st, batch, key0, state_first=True), fl, by)

cases = [
    ("union", "union", 2),
    ("K=2 padded", "padded", 2),
    ("K=2 packed", "packed", 2),
    ("K=3 padded", "padded", 3),
    ("K=3 packed", "packed", 3),
]
EXTRA = os.environ.get("EXTRA", "")
for name, mode, k in cases:
    case = go.Case(name, mode, [fixed[k]], 0)
    cfg, batch, shape = go.gain_batch(case, images, fixed[k])
    for variant in [""] + ([v for v in EXTRA.split(",") if v]):
        c2 = cfg
        if variant == "grads_off":
            import dataclasses

            c2 = dataclasses.replace(cfg, grads_off=True)
        st = fresh()
        c = gj.make_train_step(model, c2).lower(st, batch, key0, on).compile()
        fl, by = pc.cost_analysis(c)
        rec(f"GAIN {name} {shape} {variant}", timeit(c, st, batch, key0, on, state_first=True), fl, by)
    c, st, b2 = cls_step(B)
    rec(f"  cls step B={B} again", timeit(c, st, b2, key0, state_first=True))
json.dump(rows, open(f"{pc.OUT}/steps{os.environ.get('TAG', '')}.json", "w"))
