"""Validation mAP along one long train.py run: each saved checkpoint (train.py --checkpoint_every 1 --keep N)
evaluated on gain_shapes' validation (biased) and validation_unbiased splits. No test split is read. For issue 20's
item 1: does the baseline's shortcut survive 1x, 2x, 4x and 8x the default budget (600 steps)?

    python experiments/probes/budget_curve.py runs/v3_budget/baseline_seed0 --steps 600 1200 2400 4800 \
        --out experiments/results/shortcut_screen/budget_curve_v3_baseline_seed0.json

The run: train.py with biased_shapes.py's baseline flags, `--dataset gain_shapes:3.0.0 --epochs 8
--checkpoint_every 1 --keep 8`. The kept one (results/shortcut_screen/) was trained while 3.0.0 was briefly the
default, so its config says "gain_shapes": evaluate such a run with `--dataset gain_shapes:3.0.0` (its own data
set would be 2.0.0 now).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # experiments/: protocol.py
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repository: gain_jax

SPLITS = ("validation", "validation_unbiased")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a train.py run folder (metrics.json, checkpoints/)")
    parser.add_argument("--steps", type=int, nargs="*", default=None, help="checkpoint steps (default: all saved)")
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--dataset", default=None, help="the data set to evaluate on (default: the run's own)")
    parser.add_argument("--out", required=True, help="JSON file for the curve")
    args = parser.parse_args(argv)

    import protocol

    import gain_jax as gj
    import gain_jax.data as gd
    from gain_jax import config as run_config

    with open(os.path.join(args.run_dir, "metrics.json")) as handle:
        config = run_config.config_from_saved(json.load(handle)["config"])
    saved = protocol.checkpoint_steps(args.run_dir)
    steps = saved if args.steps is None else args.steps
    missing = sorted(set(steps) - set(saved))
    if missing:
        parser.error(f"no checkpoint at steps {missing} in {args.run_dir} (saved: {saved})")
    dataset = args.dataset or config.data.dataset
    info = gd.dataset_info(dataset)
    model = gj.build_model(config.train.backbone, num_classes=info.num_classes, dropout_rate=0.0)
    curve = {}
    for step in steps:
        variables, _ = protocol.restore_run(args.run_dir, step)
        curve[step] = {}
        for split in SPLITS:
            batches = gd.input_pipeline(dataset, split, data_dir=args.data_dir, batch_size=64,
                                        image_size=config.data.image_size, train=False, autoaugment=False)
            records = protocol.split_records(model, variables, config.gain, batches, info.num_classes)
            curve[step][split] = protocol.summarize_records(records, 0.5)
        print(f"step {step}: validation mAP {curve[step]['validation']['mAP']:.3f}, validation_unbiased mAP "
              f"{curve[step]['validation_unbiased']['mAP']:.3f} (gap "
              f"{curve[step]['validation']['mAP'] - curve[step]['validation_unbiased']['mAP']:.3f}), PxAP "
              f"{curve[step]['validation_unbiased']['PxAP']:.3f}", flush=True)
    with open(args.out, "w") as handle:
        json.dump({"run_dir": args.run_dir, "dataset": dataset, "config": run_config.config_to_dict(config),
                   "curve": curve}, handle, indent=1, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
