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
import gain_jax.models as gm

orig_pool = gm._max_pool_2x2


def reshape_pool(x):  # floor mode 2x2/2 max pool via reshape + max (gradient: equality mask, no select-and-scatter)
    b, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2]
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


B, S, C = 32, 64, 20
rng = np.random.default_rng(0)
model = gj.build_model("small_cnn", C, dropout_rate=0.5)
images = jnp.asarray(rng.normal(size=(B, S, S, 3)).astype(np.float32))
variables = model.init(jax.random.PRNGKey(0), images[:1])
x = jnp.maximum(images, 0)
print("pool fwd equal:", bool(jnp.all(orig_pool(x) == reshape_pool(x))))
tx = optax.adam(1e-4)


def fresh():
    return gj.create_train_state(jax.tree_util.tree_map(jnp.copy, variables), tx)


key0, on = jax.random.PRNGKey(0), jnp.float32(1.0)
fixed = {k: go.labels_with(k, B, C, rng) for k in (2, 3)}


def build(pool):
    gm._max_pool_2x2 = pool
    out = {}
    st = fresh()
    batch = {"image": images, "labels": jnp.asarray(fixed[2])}
    out["cls"] = (go.make_classification_step(model).lower(st, batch, key0).compile(), batch, ())
    for name, mode, k in [
        ("union", "union", 2),
        ("K=2 padded", "padded", 2),
        ("K=2 packed", "packed", 2),
        ("K=3 padded", "padded", 3),
        ("K=3 packed", "packed", 3),
    ]:
        cfg, b, shape = go.gain_batch(go.Case(name, mode, [fixed[k]], 0), images, fixed[k])
        out[name] = (gj.make_train_step(model, cfg).lower(fresh(), b, key0, on).compile(), b, (on,))
    gm._max_pool_2x2 = orig_pool
    return out


progs = {"orig": build(orig_pool), "reshape": build(reshape_pool)}
# gradient check on the cls step: same params after one step
st = {}
for v in progs:
    c, b, e = progs[v]["K=2 packed"]
    s, m = c(fresh(), b, key0, *e)
    st[v] = (s, m)
d = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))), st["orig"][0].params, st["reshape"][0].params)
print(
    "K=2 packed one step, max |param diff| orig vs reshape:",
    max(jax.tree_util.tree_leaves(d)),
    "loss",
    float(st["orig"][1]["loss"]),
    float(st["reshape"][1]["loss"]),
)
times = {(v, n): [] for v in progs for n in progs[v]}
states = {(v, n): fresh() for v in progs for n in progs[v]}
for _rnd in range(int(os.environ.get("ROUNDS", 4))):
    for n in progs["orig"]:
        for v in progs:
            c, b, e = progs[v][n]
            s = states[(v, n)]
            for i in range(4):
                t = time.perf_counter()
                s, m = c(s, b, key0, *e)
                jax.block_until_ready(m)
                if i:
                    times[(v, n)].append(time.perf_counter() - t)
            states[(v, n)] = s
for v in progs:
    base = statistics.median(times[(v, "cls")])
    print(
        v,
        " ".join(
            f"{n}: {statistics.median(times[(v, n)]) * 1e3:.1f}ms ({statistics.median(times[(v, n)]) / base:.2f})"
            for n in progs[v]
        ),
    )
