"""Trace the default GAIN union train step at vgg16 96x96 batch 4 (20 classes, 2 labels per image) on the CPU:
gain_jax with jax.profiler, gain_torch_ref with torch.profiler, same weights (gj.from_torchvision), images and
labels, built as bench/step_time.py builds them. Writes to $PROFILE_DIR (default /tmp/profile_work):
  vgg16_union_hlo.txt         the compiled JAX step's optimized HLO
  vgg16_union_jax/            the jax.profiler trace (perfetto)
  vgg16_union_torch_ops.json  torch's per-op self CPU time (us, summed over the traced steps) and call counts
  vgg16_union_steps.json      traced steps, and the median wall ms of untraced steps of each side
Then `group.py` reads them. Usage: python bench/profiles/vgg16_union_cpu/profile_step.py [--steps 3]
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # bench/profiles
import profile_common as pc

pc.add_repository_paths()  # bench/ and the repository
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import step_time as st  # noqa: E402
import torch  # noqa: E402

import gain_jax as gj  # noqa: E402
import gain_torch_ref as ref  # noqa: E402

BACKBONE, IMAGE_SIZE, BATCH = "vgg16", 96, 4


def build():
    """As step_time.bench_config: torch model (seed 0), its weights into JAX, normal images, 2 labels each."""
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    torch_model = ref.build_model(BACKBONE, st.NUM_CLASSES, dropout=st.DROPOUT)
    initial_state = {key: value.detach().clone() for key, value in torch_model.state_dict().items()}
    variables = gj.from_torchvision(BACKBONE, {k: v.numpy() for k, v in initial_state.items()}, st.NUM_CLASSES)
    jax_model = gj.build_model(BACKBONE, st.NUM_CLASSES, dropout_rate=st.DROPOUT)
    images = rng.normal(size=(BATCH, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    labels = st.labels_with(2, BATCH, st.NUM_CLASSES, rng)
    return initial_state, variables, jax_model, images, labels


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3, help="traced steps per side (after 2 warm-up steps)")
    args = parser.parse_args()
    os.makedirs(pc.OUT, exist_ok=True)
    torch.set_num_threads(os.cpu_count())
    initial_state, variables, jax_model, images, labels = build()

    cfg = gj.GainConfig()  # the default: union mode
    state = gj.create_train_state(jax.tree_util.tree_map(jnp.copy, variables), optax.adam(st.LEARNING_RATE))
    batch = {"image": jnp.asarray(images), "labels": jnp.asarray(labels)}
    key, on = jax.random.PRNGKey(0), jnp.float32(1.0)
    compiled = gj.make_train_step(jax_model, cfg).lower(state, batch, key, on).compile()
    with open(f"{pc.OUT}/vgg16_union_hlo.txt", "w") as handle:
        handle.write(compiled.as_text())

    def jax_step():
        nonlocal state
        state, metrics = compiled(state, batch, key, on)
        jax.block_until_ready((state, metrics))

    model, optimizer = st.fresh_torch(initial_state, BACKBONE, torch.device("cpu"))
    ref_cfg = ref.RefConfig(mode="union", max_labels=4)
    torch_step = st.torch_step_fn(model, optimizer, torch.from_numpy(images.transpose(0, 3, 1, 2).copy()),
                                  torch.from_numpy(labels), ref_cfg)
    wall = {"jax": st.median_seconds(jax_step, args.steps, 2) * 1e3,
            "torch": st.median_seconds(torch_step, args.steps, 2) * 1e3}
    print(f"untraced step: JAX {wall['jax']:.1f} ms, torch {wall['torch']:.1f} ms, "
          f"torch/JAX {wall['torch'] / wall['jax']:.2f}", flush=True)

    with jax.profiler.trace(f"{pc.OUT}/vgg16_union_jax", create_perfetto_trace=True):
        for _ in range(args.steps):
            jax_step()
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        for _ in range(args.steps):
            torch_step()
    ops = {}
    for event in prof.key_averages(group_by_input_shape=True):
        name = f"{event.key} {event.input_shapes}"
        ops[name] = {"self_us": event.self_cpu_time_total, "total_us": event.cpu_time_total, "count": event.count}
    with open(f"{pc.OUT}/vgg16_union_torch_ops.json", "w") as handle:
        json.dump(ops, handle)
    with open(f"{pc.OUT}/vgg16_union_steps.json", "w") as handle:
        json.dump({"traced_steps": args.steps, "wall_ms": wall, "load_average": os.getloadavg()[0]}, handle)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
