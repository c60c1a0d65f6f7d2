"""Experiment: a custom_vjp around lax.conv_general_dilated (monkeypatched for flax's nn.Conv while one step
compiles), against the default. --variant dot_wgrad: the weight gradient as 9 dot products over shifted NHWC
slices (input gradient unchanged); hwoi_igrad: the input gradient as a convolution with the flipped kernel
read as HWOI (weight gradient unchanged). Both at vgg16 96x96 batch 4, GAIN union step: gradients compared, then the
two compiled steps timed interleaved in one process (A B, B A, ...).
Usage: python bench/profiles/vgg16_union_cpu/conv_vjp.py [--variant dot_wgrad] [--rounds 3]
"""
import argparse
import functools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # bench/profiles
import profile_common as pc

pc.add_repository_paths()  # bench/ and the repository
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
import profile_step as ps  # noqa: E402

import gain_jax as gj  # noqa: E402

ORIGINAL = jax.lax.conv_general_dilated
NHWC_HWIO = tuple(jax.lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2)))  # as flax passes it


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_dot_wgrad(x, kernel, padding, dimension_numbers):
    return ORIGINAL(x, kernel, (1, 1), padding, dimension_numbers=dimension_numbers)


def _forward(x, kernel, padding, dimension_numbers):
    return conv_dot_wgrad(x, kernel, padding, dimension_numbers), (x, kernel)


def _backward(padding, dimension_numbers, residuals, grad):
    x, kernel = residuals
    _, input_vjp = jax.vjp(lambda x_: ORIGINAL(x_, kernel, (1, 1), padding, dimension_numbers=dimension_numbers), x)
    (grad_x,) = input_vjp(grad)
    padded = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
    height, width = grad.shape[1:3]
    grad_kernel = jnp.stack([jnp.stack([jnp.einsum("nhwc,nhwd->cd", padded[:, i:i + height, j:j + width], grad)
                                        for j in range(kernel.shape[1])]) for i in range(kernel.shape[0])])
    return grad_x, grad_kernel


conv_dot_wgrad.defvjp(_forward, _backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_hwoi_igrad(x, kernel, padding, dimension_numbers):
    return ORIGINAL(x, kernel, (1, 1), padding, dimension_numbers=dimension_numbers)


def _hwoi_backward(padding, dimension_numbers, residuals, grad):
    """Input gradient as a convolution of the gradient with the flipped kernel read as HWOI (no in/out
    transpose asked for); the weight gradient as JAX's own transpose rule gives it."""
    x, kernel = residuals
    _, kernel_vjp = jax.vjp(lambda k: ORIGINAL(x, k, (1, 1), padding, dimension_numbers=dimension_numbers), kernel)
    (grad_kernel,) = kernel_vjp(grad)
    size = kernel.shape[:2]
    back_padding = [(size[d] - 1 - padding[d][0], size[d] - 1 - padding[d][1]) for d in range(2)]
    grad_x = ORIGINAL(grad, jnp.flip(kernel, (0, 1)), (1, 1), back_padding,
                      dimension_numbers=("NHWC", "HWOI", "NHWC"))
    return grad_x, grad_kernel


conv_hwoi_igrad.defvjp(_forward, _hwoi_backward)
VARIANTS = {"dot_wgrad": conv_dot_wgrad, "hwoi_igrad": conv_hwoi_igrad}


def patched(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
            feature_group_count=1, precision=None, variant="dot_wgrad", **kwargs):
    plain = (tuple(window_strides) == (1, 1) and not isinstance(padding, str) and feature_group_count == 1
             and all(d in (None, (1, 1), 1) for d in (lhs_dilation, rhs_dilation))
             and tuple(dimension_numbers or ()) in (("NHWC", "HWIO", "NHWC"), NHWC_HWIO))
    if not plain:
        return ORIGINAL(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                        feature_group_count, precision=precision, **kwargs)
    return VARIANTS[variant](lhs, rhs, tuple(tuple(p) for p in padding), ("NHWC", "HWIO", "NHWC"))


def with_conv(conv, build):
    jax.lax.conv_general_dilated = conv
    try:
        return build()
    finally:
        jax.lax.conv_general_dilated = ORIGINAL


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps-per-round", type=int, default=3, help="the first of each is untimed")
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="dot_wgrad")
    args = parser.parse_args()
    _, variables, model, images, labels = ps.build()
    batch = {"image": jnp.asarray(images), "labels": jnp.asarray(labels)}
    key, on = jax.random.PRNGKey(0), jnp.float32(1.0)

    def loss(params):  # a classification fwd+bwd with train-mode BN/dropout: compares the parameter gradients
        logits = model.apply({**variables, "params": params}, batch["image"], train=True, rngs={"dropout": key})
        return jnp.sum(jax.nn.log_sigmoid(logits) * (1 + jnp.arange(logits.shape[-1])))

    calls = []

    def recording(*a, **k):
        calls.append(k.get("dimension_numbers", a[6] if len(a) > 6 else None))
        return ORIGINAL(*a, **k)

    with_conv(recording, lambda: jax.eval_shape(loss, variables["params"]))
    print("dimension numbers flax passes:", set(map(str, calls)), flush=True)
    convs = {"default": ORIGINAL, args.variant: functools.partial(patched, variant=args.variant)}
    grads = {name: with_conv(conv, lambda: jax.jit(jax.grad(loss))(variables["params"]))
             for name, conv in convs.items()}
    leaves = [jax.tree_util.tree_leaves(grads[name]) for name in convs]
    worst = max(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(a)) + 1e-30)) for a, b in zip(*leaves))
    print(f"parameter gradients: max |default - {args.variant}| / max |default| over leaves = {worst:.2e}", flush=True)

    tx = optax.adam(1e-4)

    def fresh():
        return gj.create_train_state(jax.tree_util.tree_map(jnp.copy, variables), tx)

    programs = {}
    for name, conv in convs.items():
        programs[name] = with_conv(conv, lambda: gj.make_train_step(model, gj.GainConfig()).lower(
            fresh(), batch, key, on).compile())
        text = programs[name].as_text()
        print(f"{name}: convolution {text.count(' convolution(')}, transpose_copy_fusion "
              f"{text.count('%transpose_copy_fusion')}, dot {text.count(' dot(')}, ynn {text.count('__ynn_fusion')} "
              "(occurrences in the HLO text)", flush=True)
    states = {name: fresh() for name in programs}
    times = {name: [] for name in programs}
    order = list(programs)
    for round_index in range(args.rounds):
        for name in (order if round_index % 2 == 0 else order[::-1]):
            for i in range(args.steps_per_round):
                start = time.perf_counter()
                states[name], metrics = programs[name](states[name], batch, key, on)
                jax.block_until_ready((states[name], metrics))
                if i:
                    times[name].append(time.perf_counter() - start)
    default, candidate = (statistics.median(times[name]) * 1e3 for name in order)
    print(f"step ms (median of {len(times['default'])}): default {default:.1f}, {args.variant} {candidate:.1f}, "
          f"{args.variant}/default {candidate / default:.3f}; load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
