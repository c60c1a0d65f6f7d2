"""small_cnn's convolutions (64x64 b32: 3->16 at 64x64, 16->32 at 32x32, 32->64 at 16x16, 64->128 at 8x8) on
XLA:CPU, one at a time, as alternative lowerings. Each cell: wall ms (min of --repeats) / process CPU ms (median).

    python bench/profiles/small_cnn_union_cpu/conv_microbench.py input_grad   # conv_0's input gradient
    python bench/profiles/small_cnn_union_cpu/conv_microbench.py weight_grad  # every layer's kernel gradient
    python bench/profiles/small_cnn_union_cpu/conv_microbench.py batch_split  # forward and VJP, batch in halves

input_grad: lax's (XLA:CPU: an Eigen 16 -> 3 channel convolution), the same with the kernel's output channels
padded to 17 (which XLA hands to YNNPACK), and the product with the kernel plus a scatter of the taps
(gain_jax.models' path). weight_grad: lax's (YNNPACK, between transposes), one product over explicit patches,
nine per-tap products, and the product with the output gradient transposed. batch_split: whether two half-batch
convolutions run side by side on the two cores (XLA's thunk executor runs independent ops concurrently).
The error column: max |difference| from lax's, relative to lax's largest value (float32).
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

LAYERS = [(32, 64, 3, 16), (32, 32, 16, 32), (32, 16, 32, 64), (32, 8, 64, 128)]  # batch, side, in, out


def conv(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))


def timing(fn, *args, repeats: int) -> str:
    jax.block_until_ready(fn(*args))
    walls, cpus = [], []
    for _ in range(repeats):
        cpu, wall = time.process_time(), time.perf_counter()
        jax.block_until_ready(fn(*args))
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return f"{min(walls) * 1e3:6.2f}/{statistics.median(cpus) * 1e3:6.2f}"


def patches(x):
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    size = x.shape[1]
    return jnp.concatenate([padded[:, r:r + size, c:c + size] for r in range(3) for c in range(3)], -1)


def input_grads():
    def lax_grad(g, w):
        return jax.vjp(lambda x: conv(x, w), jnp.zeros(g.shape[:3] + (w.shape[2],), g.dtype))[1](g)[0]

    def padded_out(g, w):
        kernel = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
        return conv(g, jnp.pad(kernel, ((0, 0), (0, 0), (0, 0), (0, 17 - kernel.shape[3]))))[..., :w.shape[2]]

    def product_scatter(g, w):
        channels, size = w.shape[2], g.shape[1]
        window_grads = jnp.dot(g, w.reshape(-1, w.shape[3]).T)
        total = sum(jnp.pad(window_grads[..., (r * 3 + c) * channels:(r * 3 + c + 1) * channels],
                            ((0, 0), (r, 2 - r), (c, 2 - c), (0, 0))) for r in range(3) for c in range(3))
        return total[:, 1:1 + size, 1:1 + size]

    return {"lax": lax_grad, "pad_out_17": padded_out, "product_scatter": product_scatter}


def weight_grads():
    def lax_grad(x, g):
        kernel = jnp.zeros((3, 3, x.shape[3], g.shape[3]), x.dtype)
        return jax.vjp(lambda w: conv(x, w), kernel)[1](g)[0]

    def patch_product(x, g):
        rows = patches(x).reshape(-1, 9 * x.shape[3])
        return lax.dot_general(rows, g.reshape(-1, g.shape[3]), (((0,), (0,)), ((), ()))).reshape(
            3, 3, x.shape[3], g.shape[3])

    def tap_products(x, g):
        padded, size, flat = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))), x.shape[1], g.reshape(-1, g.shape[3])
        return jnp.stack([lax.dot_general(padded[:, r:r + size, c:c + size].reshape(-1, x.shape[3]), flat,
                                          (((0,), (0,)), ((), ()))) for r in range(3) for c in range(3)]).reshape(
            3, 3, x.shape[3], g.shape[3])

    def transposed_product(x, g):
        rows = patches(x).reshape(-1, 9 * x.shape[3])
        return jnp.dot(g.reshape(-1, g.shape[3]).T, rows).T.reshape(3, 3, x.shape[3], g.shape[3])

    return {"lax": lax_grad, "patch_product": patch_product, "tap_products": tap_products,
            "transposed_product": transposed_product}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("input_grad", "weight_grad", "batch_split"))
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    for batch, size, channels_in, channels_out in LAYERS:
        x = jnp.asarray(rng.normal(size=(batch, size, size, channels_in)), jnp.float32)
        w = jnp.asarray(rng.normal(size=(3, 3, channels_in, channels_out)), jnp.float32)
        g = jnp.asarray(rng.normal(size=(batch, size, size, channels_out)), jnp.float32)
        line = f"{size}x{size} {channels_in}->{channels_out}"
        if args.what == "batch_split":
            def halves(x, w):
                return jnp.concatenate([conv(half, w) for half in jnp.split(x, 2)], 0)
            for name, fn in (("full", conv), ("halves", halves)):
                vjp = jax.jit(lambda x, w, g, fn=fn: jax.vjp(fn, x, w)[1](g))
                line += (f" | {name} fwd {timing(jax.jit(fn), x, w, repeats=args.repeats)}"
                         f" vjp {timing(vjp, x, w, g, repeats=args.repeats)}")
        else:
            if args.what == "input_grad" and size != 64:
                continue  # only conv_0 runs in Eigen
            variants, operands = (input_grads(), (g, w)) if args.what == "input_grad" else (weight_grads(), (x, g))
            reference = jax.jit(variants["lax"])(*operands)
            for name, fn in variants.items():
                jitted = jax.jit(fn)
                error = float(jnp.max(jnp.abs(jitted(*operands) - reference)) / jnp.max(jnp.abs(reference)))
                line += f" | {name} {timing(jitted, *operands, repeats=args.repeats)} err {error:.0e}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
