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

orig = gm._max_pool_2x2


def _windows(x):
    b, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2]
    return x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4).reshape(b, h // 2, w // 2, c, 4)


@jax.custom_vjp
def pool_first(x):
    return _windows(x).max(-1)


def fwd(x):
    win = _windows(x)
    return win.max(-1), (jnp.argmax(win, -1), x.shape)


def bwd(res, g):
    idx, shape = res
    b, h, w, c = shape
    gw = jax.nn.one_hot(idx, 4, dtype=g.dtype) * g[..., None]  # [b,h/2,w/2,c,4]
    gx = gw.reshape(b, h // 2, w // 2, c, 2, 2).transpose(0, 1, 4, 2, 5, 3).reshape(b, h // 2 * 2, w // 2 * 2, c)
    return (jnp.pad(gx, ((0, 0), (0, h - gx.shape[1]), (0, w - gx.shape[2]), (0, 0))),)


pool_first.defvjp(fwd, bwd)
m = gj.build_model("small_cnn", 20, dropout_rate=0.5)
x = jnp.asarray(np.random.default_rng(0).normal(size=(32, 64, 64, 3)).astype(np.float32))
v = m.init(jax.random.PRNGKey(0), x[:1])


def g(pool):
    gm._max_pool_2x2 = pool

    def f(p, x):
        out = m.apply(
            {"params": p, "batch_stats": v["batch_stats"]},
            x,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": jax.random.PRNGKey(3)},
        )[0]
        return (jax.nn.sigmoid(out) * jnp.arange(20.0)).sum()

    r = jax.jit(jax.grad(f, argnums=(0, 1)))(v["params"], x)
    gm._max_pool_2x2 = orig
    return r


a, b = g(orig), g(pool_first)
print(
    "first-argmax custom_vjp: max abs diff",
    max(float(jnp.max(jnp.abs(p - q))) for p, q in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))),
)
tx = optax.adam(1e-4)
key0, on = jax.random.PRNGKey(0), jnp.float32(1.0)


def fresh():
    return gj.create_train_state(jax.tree_util.tree_map(jnp.copy, v), tx)


lab = go.labels_with(2, 32, 20, np.random.default_rng(1))
progs = {}
for name, pool in (("orig", orig), ("first_vjp", pool_first)):
    gm._max_pool_2x2 = pool
    batch = {"image": x, "labels": jnp.asarray(lab)}
    progs[(name, "cls")] = (go.make_classification_step(m).lower(fresh(), batch, key0).compile(), batch, ())
    cfg, b2, _ = go.gain_batch(go.Case("p", "packed", [lab], 0), x, lab)
    progs[(name, "K=2 packed")] = (gj.make_train_step(m, cfg).lower(fresh(), b2, key0, on).compile(), b2, (on,))
    gm._max_pool_2x2 = orig
times = {k: [] for k in progs}
states = {k: fresh() for k in progs}
for _r in range(4):
    for k, (c, b, e) in progs.items():
        s = states[k]
        for i in range(4):
            t = time.perf_counter()
            s, o = c(s, b, key0, *e)
            jax.block_until_ready(o)
            if i:
                times[k].append(time.perf_counter() - t)
        states[k] = s
for k in progs:
    print(k, f"{statistics.median(times[k]) * 1e3:.1f} ms")
