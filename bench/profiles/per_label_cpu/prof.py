import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(__file__, "../../..")))  # bench/, for gain_overhead
sys.path.insert(0, os.path.abspath(os.path.join(__file__, "../../../..")))  # the repository
import gain_overhead as go
import jax
import jax.numpy as jnp
import numpy as np
import optax

import gain_jax as gj

OUT = os.environ.get("PROFILE_DIR", "/tmp/profile_work")  # traces and dumps go here

B, S, C = 32, 64, 20
STEPS = int(os.environ.get("STEPS", 10))
rng = np.random.default_rng(0)
model = gj.build_model("small_cnn", C, dropout_rate=0.5)
images_all = jnp.asarray(rng.normal(size=(3 * B, S, S, 3)).astype(np.float32))
images = images_all[:B]
variables = model.init(jax.random.PRNGKey(0), images[:1])
tx = optax.adam(1e-4)


def fresh():
    return gj.create_train_state(jax.tree_util.tree_map(jnp.copy, variables), tx)


key0, on = jax.random.PRNGKey(0), jnp.float32(1.0)
fixed = {k: go.labels_with(k, B, C, rng) for k in (2, 3)}


def cost(compiled):
    ca = compiled.cost_analysis()
    if isinstance(ca, list):
        ca = ca[0]
    return ca.get("flops", float("nan")), ca.get("bytes accessed", float("nan"))


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
    fl, by = cost(c)
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
        fl, by = cost(c)
        rec(f"GAIN {name} {shape} {variant}", timeit(c, st, batch, key0, on, state_first=True), fl, by)
    c, st, b2 = cls_step(B)
    rec(f"  cls step B={B} again", timeit(c, st, b2, key0, state_first=True))
json.dump(rows, open(f"{OUT}/steps{os.environ.get('TAG', '')}.json", "w"))
