"""Where the trained models' attention masks fall, and how much of a class survives erasing: the evidence for
the reading of the biased_shapes results (does attention mining move the maps onto the objects, or spread
them over the background texture that also predicts the class?).

    python experiments/mask_coverage.py --arms baseline GAIN GAIN_ext ablation:am_weight=1

For every finished run of the arms (experiments/biased_shapes.py's run folders, arm names as there), on the
unbiased *validation* images (`validation_unbiased`: diagnostics never look at test_unbiased), for every
(image, ground-truth class) pair, from the final checkpoint in evaluation mode:

- the run's soft mask T of the class (its CAM method, min-max scaled, its mask function, sigma and omega: what
  GAIN's attention-mining stream erases for that class): `coverage` = mean T over the image, `T on object` =
  mean T over the class's own pixels, `T on background` = mean T over background pixels, `object share` = the
  part of the mask's mass on the class's pixels (the class's pixels are `object pixels` of the image);
- the class's sigmoid probability on the image (`p image`), on the image erased by T with the run's fill
  (`p erased by T`: what L_am minimizes), and on the image with the class's ground-truth object erased
  (`p object erased`, T = the object's mask, the same fill): how much the class survives without its object,
  i.e. what the model reads from elsewhere (the texture).

Each figure is the mean over pairs, then mean ± std (ddof=1) over the seeds. Nothing is trained. Any other flag
is biased_shapes.py's (e.g. `--epochs 12` for runs trained with it): the runs must match those settings.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import biased_shapes  # the arms, run folders and configs are defined there

SPLIT = "validation_unbiased"
COLUMNS = (  # (key, title)
    ("coverage", "coverage"), ("mask_on_object", "T on object"), ("mask_on_background", "T on background"),
    ("object_share", "object share"), ("object_pixels", "object pixels"),
    ("p_image", "p image"), ("p_erased", "p erased by T"), ("p_object_erased", "p object erased"),
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", nargs="+", required=True, help="arm names as in experiments/biased_shapes.py")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--logdir", default=os.path.join(biased_shapes.REPO_ROOT, "runs", "biased_shapes"),
                   help="biased_shapes.py's --logdir")
    p.add_argument("--data_dir", default=None, help="tfds data dir (train.py's --data_dir)")
    p.add_argument("--out", default=None, help="also write the table to <out>.md and the figures to <out>.json")
    return p


def study_args(args, study_flags):
    """biased_shapes.py's parsed flags for these arms and seeds: its defaults (the studies' settings) and
    `study_flags`, the command line's flags this script does not know."""
    parser = biased_shapes.build_parser()
    flags = [*study_flags, "--arms", *args.arms, "--seeds", *map(str, args.seeds), "--logdir", args.logdir]
    if args.data_dir:
        flags += ["--data_dir", args.data_dir]
    study = parser.parse_args(flags)
    biased_shapes.check_args(study, parser)
    return study


def make_measure(model, gain_cfg):
    """jit-compiled `measure(variables, images, labels, masks) -> {key: [B, C]}` sums and counts per pair."""
    import jax
    import jax.numpy as jnp

    import gain_jax as gj
    from gain_jax.attention import apply_mask, soft_mask
    from gain_jax.variants import lookup

    def class_probabilities(variables, images):  # [B*C,H,W,3] -> [B*C, C]
        return jax.nn.sigmoid(model.apply(variables, images, train=False))

    @jax.jit
    def measure(variables, images, labels, masks):
        batch, num_classes = labels.shape
        _, cams = gj.class_cams(model, variables, images, gain_cfg)  # [B,C,H,W], min-max scaled
        mask = soft_mask(cams, gain_cfg.sigma, gain_cfg.omega, gain_cfg.mask)
        object_pixels = (masks[:, None] == jnp.arange(1, num_classes + 1)[None, :, None, None]).astype(mask.dtype)
        background = (masks == 0).astype(mask.dtype)[:, None]
        fill = jnp.asarray(lookup("erase", gain_cfg.erase)(images, gain_cfg.fill), images.dtype)
        if fill.ndim == images.ndim:
            fill = fill[:, None]
        own = jnp.eye(num_classes, dtype=mask.dtype)  # row c picks class c's probability

        def probability_of_own_class(erasing):  # erasing [B,C,H,W] -> p of class c on image b erased by [b,c]
            erased = apply_mask(images[:, None], erasing, fill).reshape((batch * num_classes,) + images.shape[1:])
            probs = class_probabilities(variables, erased).reshape(batch, num_classes, num_classes)
            return (probs * own).sum(-1)

        area = mask.shape[-1] * mask.shape[-2]
        mask_sum = mask.sum((-2, -1))
        object_count = object_pixels.sum((-2, -1))
        return {
            "coverage": mask_sum / area,
            "mask_on_object": (mask * object_pixels).sum((-2, -1)) / jnp.maximum(object_count, 1),
            "mask_on_background": (mask * background).sum((-2, -1)) / jnp.maximum(background.sum((-2, -1)), 1),
            "object_share": (mask * object_pixels).sum((-2, -1)) / jnp.maximum(mask_sum, 1e-6),
            "object_pixels": object_count / area,
            "p_image": class_probabilities(variables, images),
            "p_erased": probability_of_own_class(mask),
            "p_object_erased": probability_of_own_class(object_pixels),
            "valid": (labels > 0) & (object_count > 0),
        }

    return measure


def measure_run(arm: str, seed: int, study) -> dict:
    """{key: mean over the split's (image, ground-truth class) pairs} for one finished run."""
    import jax.numpy as jnp

    import gain_jax as gj
    import gain_jax.data as gd
    from gain_jax import checkpoint

    directory = biased_shapes.run_dir(arm, seed, study)
    checkpoint_dir = os.path.join(directory, "checkpoints")
    manager = checkpoint.open_manager(checkpoint_dir) if os.path.isdir(checkpoint_dir) else None
    step = manager.latest_step() if manager is not None else None
    if step is None or biased_shapes.finished_metrics(arm, seed, study) is None:
        raise SystemExit(f"mask_coverage: no finished run of {arm} seed {seed} in {directory} "
                         f"(train it with experiments/biased_shapes.py --arms '{arm}')")
    variables = checkpoint.restore_variables(manager, step)
    config = biased_shapes.run_config_of(arm, seed, study)
    info = gd.dataset_info("gain_shapes")
    model = gj.build_model(config.train.backbone, num_classes=info.num_classes, dropout_rate=0.0)
    measure = make_measure(model, config.gain)
    sums, count = {}, 0
    for batch in gd.input_pipeline("gain_shapes", SPLIT, data_dir=study.data_dir, batch_size=100,
                                   image_size=config.data.image_size, train=False, autoaugment=False):
        values = measure(variables, jnp.asarray(batch["image"]), jnp.asarray(batch["labels"]),
                         jnp.asarray(batch["mask"]))
        valid = np.asarray(values.pop("valid"))
        for key, value in values.items():
            sums[key] = sums.get(key, 0.0) + float(np.asarray(value)[valid].sum())
        count += int(valid.sum())
    return {key: total / count for key, total in sums.items()} | {"pairs": count}


def main(argv=None) -> int:
    args, study_flags = build_parser().parse_known_args(argv)
    study = study_args(args, study_flags)
    results = {arm: {seed: measure_run(arm, seed, study) for seed in args.seeds} for arm in args.arms}
    header = "| arm | " + " | ".join(title for _, title in COLUMNS) + " |"
    lines = [f"{SPLIT}, final checkpoints, mean ± std over seeds {args.seeds} of the mean over (image, "
             f"ground-truth class) pairs ({next(iter(results[args.arms[0]].values()))['pairs']} pairs)",
             "", header, "|---" * (len(COLUMNS) + 1) + "|"]
    for arm, per_seed in results.items():
        cells = []
        for key, _ in COLUMNS:
            values = [per_seed[seed][key] for seed in args.seeds]
            spread = f" ± {np.std(values, ddof=1):.3f}" if len(values) > 1 else ""
            cells.append(f"{np.mean(values):.3f}{spread}")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out + ".md", "w") as handle:
            handle.write(text + "\n")
        with open(args.out + ".json", "w") as handle:
            json.dump({"split": SPLIT, "seeds": args.seeds,
                       "runs": {arm: {str(s): v for s, v in per_seed.items()} for arm, per_seed in results.items()}},
                      handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
