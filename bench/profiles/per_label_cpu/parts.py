import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # bench/profiles
import profile_common as pc

pc.add_repository_paths()  # bench/ and the repository
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from gain_jax.attention import apply_mask, head_gradcams, minmax_normalize, resize_align_corners, soft_mask  # noqa: E402

B, S, C = 32, 64, 20
setup = pc.small_cnn_setup(3 * B, S, C)
rng, model, imgs, variables = setup.rng, setup.model, setup.images, setup.variables
params, bstats = variables["params"], variables["batch_stats"]
key = jax.random.PRNGKey(1)


def cost(f, *a):
    c = jax.jit(f).lower(*a).compile()
    flops, bytes_accessed = pc.cost_analysis(c)
    return c, flops / 1e9, bytes_accessed / 1e6


def timeit(c, *a, steps=15, warm=3):
    ts = []
    for _i in range(warm + steps):
        t = time.perf_counter()
        jax.block_until_ready(c(*a))
        ts.append(time.perf_counter() - t)
    return statistics.median(ts[warm:]) * 1e3


def run(name, f, *a):
    c, fl, by = cost(f, *a)
    print(f"{name:<48} {timeit(c, *a):8.2f} ms  {fl:7.3f} GF {by:8.1f} MB", flush=True)


def cls_fb(p, x):  # classification fwd+bwd, train BN, weight grads only
    def loss(p):
        out, _ = model.apply(
            {"params": p, "batch_stats": bstats}, x, train=True, mutable=["batch_stats"], rngs={"dropout": key}
        )
        return jax.nn.sigmoid(out).sum()

    return jax.grad(loss)(p)


def am_grads(wrt_params: bool, wrt_pixels: bool):
    """AM stream fwd+bwd: frozen BN; gradients w.r.t. the parameters and/or the input pixels."""
    argnums = tuple(i for i, on in enumerate((wrt_params, wrt_pixels)) if on)

    def loss(p, x):
        return jax.nn.softmax(
            model.apply({"params": p, "batch_stats": bstats}, x, train=True, freeze_bn=True, rngs={"dropout": key})
        ).sum()

    def grads(p, x):
        g = jax.grad(loss, argnums=argnums)(p, x)
        return g if len(argnums) > 1 else g[0]

    return grads


def fwd_only(p, x):
    return model.apply({"params": p, "batch_stats": bstats}, x, train=False)


for n in (B, 2 * B, 3 * B):
    x = imgs[:n]
    run(f"cls fwd only N={n}", fwd_only, params, x)
    run(f"cls fwd+bwd (param grads) N={n}", cls_fb, params, x)
    run(f"AM fwd+bwd (param+pixel grads) N={n}", am_grads(True, True), params, x)
    run(f"AM fwd+bwd (param grads only) N={n}", am_grads(True, False), params, x)
    run(f"AM fwd+bwd (pixel grads only) N={n}", am_grads(False, True), params, x)

feats = model.apply(variables, imgs[:B], train=False, method="features")


def gcam(p, feats, sel):
    def hf(f):
        return model.apply({"params": p, "batch_stats": bstats}, f, train=True, method="head", rngs={"dropout": key})

    return head_gradcams(hf, feats, sel)


def gcam_fb(p, feats, sel):  # grad of sum(cams) w.r.t. feats (the path the AM loss takes)
    return jax.grad(lambda f: gcam(p, f, sel)[1].sum() + gcam(p, f, sel)[0].sum())(feats)


def chain(cams, x):
    h = resize_align_corners(cams, (S, S))
    m = soft_mask(minmax_normalize(h), 0.5, 10.0, "sigmoid")
    return apply_mask(x[:, None], m, 0.0)


def chain_fb(cams, x, ct):
    out, vjp = jax.vjp(lambda c: chain(c, x), cams)
    return vjp(ct)


for k in (1, 2, 3, 4):
    sel = jnp.asarray(np.eye(C, dtype=np.float32)[rng.integers(0, C, (B, k))])
    run(f"Grad-CAM fwd K={k}", gcam, params, feats, sel)
    run(f"Grad-CAM fwd+bwd(to feats) K={k}", gcam_fb, params, feats, sel)
    cams = jnp.abs(jnp.asarray(rng.normal(size=(B, k, 8, 8)).astype(np.float32)))
    run(f"resize/minmax/mask/erase fwd K={k}", chain, cams, imgs[:B])
    ct = jnp.asarray(rng.normal(size=(B, k, S, S, 3)).astype(np.float32))
    run(f"resize/minmax/mask/erase fwd+vjp K={k}", chain_fb, cams, imgs[:B], ct)
rows = jnp.asarray(np.arange(2 * B, dtype=np.int32))
flat = jnp.asarray(rng.normal(size=(2 * B, S, S, 3)).astype(np.float32))
run(
    "packing gather [64 rows]+scatter logits",
    lambda f, r: (f[r], jnp.zeros((2 * B, C)).at[r].add(f[r][:, 0, 0, :1] * jnp.ones((1, C)))),
    flat,
    rows,
)
