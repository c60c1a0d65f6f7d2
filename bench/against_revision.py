"""The default GAIN train step of this working tree against the same step at an earlier git revision, in one run.

    python bench/against_revision.py                    # vs d6faff0 (before the variants refactor)
    python bench/against_revision.py --revision HEAD~3 --steps 20
    python bench/against_revision.py --backbone small_cnn --image-size 32 --batch-size 8 --steps 2 --warmup 1
                                                        # smoke run

The revision's `gain_jax/` is extracted with `git archive` into a temporary directory as the package
`gain_jax_before` (every `gain_jax` name in its sources rewritten; `gain_jax/data`, which imports TensorFlow,
left out and checked not to be imported by the rest). Both packages are imported in this process. For each
configuration (default: small_cnn 64x64 batch 32, vgg16 112x112 batch 4) both build the same backbone, start
from the same weights (the new package's initialization, whose parameter tree the old one must match), see
the same images and labels (2 per image, 20 classes) and run the default `GainConfig()` (union mode) train
step with attention mining on, each compiled ahead of time. Steps are interleaved, one new and one old per
round, the order alternating from round to round (A B, B A, ...), so that machine noise hits both alike. The
median step time of each and the ratio new/old are printed (< 1: the working tree is faster), with the median
of the per-round ratios ("paired"), and the difference of the two sides' first-step losses (same weights,
batch and key: about 0 when both revisions compute the same step).

"new" is this working tree's `gain_jax`, uncommitted changes included (the header says whether there are any).
Only JAX, flax, optax and numpy are imported (runs on a GPU machine without TensorFlow or torch).
"""
from __future__ import annotations

import argparse
import importlib
import io
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
import optax

import gain_jax as gj

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OLD_NAME = "gain_jax_before"
NUM_CLASSES = 20


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", REPO, *args], check=True, capture_output=True, text=True).stdout.strip()


def extract_revision(revision: str, destination: str, name: str = OLD_NAME) -> str:
    """`revision`'s gain_jax/ (without gain_jax/data) under `destination`/`name`, imports renamed."""
    archive = subprocess.run(["git", "-C", REPO, "archive", "--format=tar", revision, "gain_jax"], check=True,
                             capture_output=True).stdout
    package = os.path.join(destination, name)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        for member in tar.getmembers():
            parts = member.name.split("/")
            if not member.isfile() or not member.name.endswith(".py") or parts[:2] == ["gain_jax", "data"]:
                continue
            source = tar.extractfile(member).read().decode()
            target = os.path.join(package, *parts[1:])
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "w") as handle:
                handle.write(re.sub(r"\bgain_jax\b", name, source))
    if not os.path.exists(os.path.join(package, "__init__.py")):
        raise SystemExit(f"{revision} has no gain_jax/__init__.py")
    for root, _, files in os.walk(package):
        for file in files:
            with open(os.path.join(root, file)) as handle:
                text = handle.read()
            # module-level imports only: those inside functions (train_loop's, run by a training run) never
            # run here, and sys.modules is checked once both packages are imported
            imports_left_out = (rf"^(import|from)\s+({name}\.data|tensorflow|torch)\b"
                                rf"|^from\s+{name}\s+import\s+.*\bdata\b")
            if re.search(imports_left_out, text, re.MULTILINE):
                raise SystemExit(f"{revision}:gain_jax/{os.path.relpath(os.path.join(root, file), package)} "
                                 f"imports gain_jax.data, TensorFlow or torch; this benchmark leaves those out")
    return package


def labels_with_two(batch_size: int, rng: np.random.Generator) -> np.ndarray:
    labels = np.zeros((batch_size, NUM_CLASSES), np.float32)
    for row in labels:
        row[rng.choice(NUM_CLASSES, 2, replace=False)] = 1.0
    return labels


def same_structure(a, b) -> bool:
    shapes = lambda tree: jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), tree)  # noqa: E731
    return jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b) and shapes(a) == shapes(b)


def bench(old, backbone: str, image_size: int, batch_size: int, steps: int, warmup: int):
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(batch_size, image_size, image_size, 3)).astype(np.float32))
    batch = {"image": images, "labels": jnp.asarray(labels_with_two(batch_size, rng))}
    key0, on = jax.random.PRNGKey(0), jnp.float32(1.0)

    new_model = gj.build_model(backbone, NUM_CLASSES, dropout_rate=0.5)
    old_model = old.build_model(backbone, NUM_CLASSES, dropout_rate=0.5)
    variables = new_model.init(jax.random.PRNGKey(0), images[:1])
    if not same_structure(variables, old_model.init(jax.random.PRNGKey(0), images[:1])):
        raise SystemExit(f"{backbone}: the two revisions' parameter trees differ; cannot share weights")

    sides = {}
    for label, package, model in (("new", gj, new_model), ("old", old, old_model)):
        state = package.create_train_state(jax.tree_util.tree_map(jnp.copy, variables), optax.adam(1e-4))
        step = package.make_train_step(model, package.GainConfig()).lower(state, batch, key0, on).compile()
        sides[label] = [step, state, [], None]

    for i in range(warmup + steps):
        order = ("new", "old") if i % 2 == 0 else ("old", "new")
        for label in order:
            step, state, times, _ = sides[label]
            start = time.perf_counter()
            state, metrics = step(state, batch, jax.random.PRNGKey(i), on)
            jax.block_until_ready((state, metrics))
            if i >= warmup:
                times.append(time.perf_counter() - start)
            sides[label][1] = state
            if i == 0:
                sides[label][3] = float(metrics["loss"])
    new_times, old_times = sides["new"][2], sides["old"][2]
    paired = statistics.median(n / o for n, o in zip(new_times, old_times))
    loss_diff = abs(sides["new"][3] - sides["old"][3])
    return statistics.median(new_times), statistics.median(old_times), paired, loss_diff


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--revision", default="d6faff0", help="git revision to compare with (default: d6faff0, "
                        "the commit before the variants refactor)")
    parser.add_argument("--backbone", default=None, help="one backbone (default: small_cnn, then vgg16)")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=10, help="timed steps of each side (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each side first")
    args = parser.parse_args(argv)
    if args.backbone:
        configs = [(args.backbone, args.image_size or 224, args.batch_size or 8)]
    else:
        configs = [("small_cnn", 64, 32), ("vgg16", 112, 4)]

    old_commit = git("rev-parse", "--short", f"{args.revision}^{{commit}}")
    dirty = bool(git("status", "--porcelain", "--", "gain_jax"))
    with tempfile.TemporaryDirectory() as tmp:
        extract_revision(args.revision, tmp)
        sys.path.insert(0, tmp)
        old = importlib.import_module(OLD_NAME)
        assert os.path.dirname(old.__file__).startswith(tmp), old.__file__
        for module in ("tensorflow", "torch"):
            if module in sys.modules:
                raise SystemExit(f"{module} was imported; this benchmark must run without it")
        print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
        print(f"new: working tree at {git('rev-parse', '--short', 'HEAD')}"
              f"{' with uncommitted changes in gain_jax/' if dirty else ''}; old: {old_commit} ({args.revision})")
        print(f"default GainConfig() (union), 2 labels per image, {args.steps} timed steps each, interleaved")
        print(f"{'backbone':<10} {'input':>9} {'batch':>5}  {'new ms':>8} {'old ms':>8} {'new/old':>8} "
              f"{'paired':>7} {'|d loss| step 1':>15}")
        for backbone, size, batch_size in configs:
            new, before, paired, loss_diff = bench(old, backbone, size, batch_size, args.steps, args.warmup)
            print(f"{backbone:<10} {f'{size}x{size}':>9} {batch_size:>5}  {new * 1e3:>8.1f} {before * 1e3:>8.1f} "
                  f"{new / before:>8.3f} {paired:>7.3f} {loss_diff:>15.2e}", flush=True)


if __name__ == "__main__":
    main()
