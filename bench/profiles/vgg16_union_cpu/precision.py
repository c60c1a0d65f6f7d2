"""Experiment (issue 12, item 4: "precision config"): the default GAIN union train step at vgg16 96x96 batch 4
compiled under each `jax.default_matmul_precision` setting (the precision config of every convolution and dot
in the step), timed interleaved in one process, with the first step's loss and gradients of each against
"highest" (float32 products) and the count of bf16 values in the optimized HLO. Built as profile_step.py
builds it (step_time.py's weights, images and labels). Also --backbone small_cnn (64x64, batch 32).
Usage: python bench/profiles/vgg16_union_cpu/precision.py [--precisions highest bfloat16 ...] [--rounds 3]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # bench/profiles
import profile_common as pc

pc.add_repository_paths()  # bench/ and the repository
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
import profile_step as ps  # noqa: E402
import step_time as st  # noqa: E402

import gain_jax as gj  # noqa: E402

# jax_default_matmul_precision's values: the three Precision levels, and dot-algorithm presets
PRECISIONS = ("highest", "default", "bfloat16", "tensorfloat32", "BF16_BF16_F32", "F32_F32_F32")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS))
    parser.add_argument("--backbone", choices=("vgg16", "small_cnn"), default="vgg16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps-per-round", type=int, default=3, help="the first of each is untimed")
    args = parser.parse_args()
    if args.backbone == "small_cnn":
        ps.BACKBONE, ps.IMAGE_SIZE, ps.BATCH = "small_cnn", 64, 32
    _, variables, model, images, labels = ps.build()
    batch = {"image": jnp.asarray(images), "labels": jnp.asarray(labels)}
    key, on = jax.random.PRNGKey(0), jnp.float32(1.0)
    tx = optax.adam(st.LEARNING_RATE)

    def fresh():
        return gj.create_train_state(jax.tree_util.tree_map(jnp.copy, variables), tx)

    def first_step(params):  # the train step's loss, differentiated as the step does, without the update
        out = gj.gain_forward(model, {**variables, "params": params}, batch["image"], batch["labels"],
                              gj.GainConfig(), train=True, rngs={"dropout": key})
        return gj.gain_losses(out, batch["labels"], gj.GainConfig())["total"]

    programs, reference = {}, None
    print(f"{args.backbone} {ps.IMAGE_SIZE}x{ps.IMAGE_SIZE} batch {ps.BATCH}, GAIN union step, jax {jax.__version__}")
    for precision in args.precisions:
        try:
            with jax.default_matmul_precision(precision):
                compiled = gj.make_train_step(model, gj.GainConfig()).lower(
                    fresh(), batch, key, on).compile()
                loss, grads = jax.jit(jax.value_and_grad(first_step))(variables["params"])
        except Exception as error:  # report a setting XLA:CPU refuses, go on with the others
            print(f"{precision:>14}: FAILED {type(error).__name__}: {str(error).splitlines()[0][:160]}", flush=True)
            continue
        leaves = jax.tree_util.tree_leaves(grads)
        if reference is None:
            reference = (loss, leaves)
        loss_diff = abs(float(loss) - float(reference[0])) / abs(float(reference[0]))
        grad_diff = max(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))
                        for a, b in zip(leaves, reference[1]))
        text = compiled.as_text()
        print(f"{precision:>14}: loss {float(loss):.7f} (rel diff {loss_diff:.1e}), worst gradient leaf max|diff|/max "
              f"{grad_diff:.1e} vs {args.precisions[0]}; bf16 in HLO {text.count('bf16[')}, "
              f"algorithm= {text.count('algorithm=')}", flush=True)
        programs[precision] = (compiled, batch, (on,))
    states = {name: fresh() for name in programs}
    times = pc.interleaved_step_times(programs, states, key, rounds=args.rounds, steps_per_round=args.steps_per_round)
    base = pc.median_ms(times[next(iter(programs))])
    for name in programs:
        ms = pc.median_ms(times[name])
        print(f"{name:>14}: step {ms:.1f} ms (median of {len(times[name])}), {base / ms:.2f}x the first")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
