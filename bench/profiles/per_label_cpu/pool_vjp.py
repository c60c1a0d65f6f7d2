import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # bench/profiles
import profile_common as pc

pc.add_repository_paths()  # bench/ and the repository
import gain_overhead as go  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import gain_jax as gj  # noqa: E402
import gain_jax.models as gm  # noqa: E402

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
setup = pc.small_cnn_setup(32, 64, 20)
m, x, v, fresh, key0, on = setup.model, setup.images, setup.variables, setup.fresh, setup.key0, setup.on


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
lab = go.labels_with(2, 32, 20, np.random.default_rng(1))
progs = {}
for name, pool in (("orig", orig), ("first_vjp", pool_first)):
    gm._max_pool_2x2 = pool
    batch = {"image": x, "labels": jnp.asarray(lab)}
    progs[(name, "cls")] = (go.make_classification_step(m).lower(fresh(), batch, key0).compile(), batch, ())
    cfg, b2, _ = go.gain_batch(go.Case("p", "packed", [lab], 0), x, lab)
    progs[(name, "K=2 packed")] = (gj.make_train_step(m, cfg).lower(fresh(), b2, key0, on).compile(), b2, (on,))
    gm._max_pool_2x2 = orig
times = pc.interleaved_step_times(progs, {k: fresh() for k in progs}, key0)
for k in progs:
    print(k, f"{pc.median_ms(times[k]):.1f} ms")
