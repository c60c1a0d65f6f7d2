import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # bench/profiles
import profile_common as pc

pc.add_repository_paths()  # bench/ and the repository
import gain_overhead as go  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import gain_jax as gj  # noqa: E402
import gain_jax.models as gm  # noqa: E402

orig_pool = gm._max_pool_2x2


def reshape_pool(x):  # floor mode 2x2/2 max pool via reshape + max (gradient: equality mask, no select-and-scatter)
    b, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2]
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


B, S, C = 32, 64, 20
setup = pc.small_cnn_setup(B, S, C)
rng, model, images, fresh, key0, on = setup.rng, setup.model, setup.images, setup.fresh, setup.key0, setup.on
x = jnp.maximum(images, 0)
print("pool fwd equal:", bool(jnp.all(orig_pool(x) == reshape_pool(x))))
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
flat = {(v, n): progs[v][n] for n in progs["orig"] for v in progs}  # interleaved: each case, both pools
times = pc.interleaved_step_times(flat, {k: fresh() for k in flat}, key0, int(os.environ.get("ROUNDS", 4)))
for v in progs:
    base = pc.median_ms(times[(v, "cls")])
    print(
        v,
        " ".join(
            f"{n}: {pc.median_ms(times[(v, n)]):.1f}ms ({pc.median_ms(times[(v, n)]) / base:.2f})"
            for n in progs[v]
        ),
    )
