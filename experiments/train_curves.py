"""Per-epoch training losses and validation mAP of finished biased_shapes runs, averaged over seeds: the
evidence behind the reading of the results (does L_am fall because the evidence is erased, or because the
erased images are told apart? does the mask loss settle at the all-zero map's fit?).

    python experiments/train_curves.py --arms baseline GAIN_upstream GAIN GAIN_ext ex_only

Reads <logdir>/<arm>_seed<seed>/metrics.json (the runs `experiments/biased_shapes.py` trains; arm names as
there) and prints, per arm and epoch, the mean over the seeds of the
train steps' L_cl, L_am and L_ext (unweighted; where L_am weighs 0, runs trained before the loop left the
attention-mining stream out of those epochs computed it, later ones record nan)
and of validation mAP, plus the Grad-CAM metrics of the final evaluation. Nothing is trained.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from biased_shapes import REPO_ROOT, run_name  # the run folders are named there


def run_folder(logdir: str, arm: str, seed: int) -> str:
    return os.path.join(logdir, run_name(arm, seed))


def load(logdir: str, arm: str, seeds) -> list[dict]:
    histories = []
    for seed in seeds:
        path = os.path.join(run_folder(logdir, arm, seed), "metrics.json")
        if not os.path.isfile(path):
            raise SystemExit(f"train_curves: {path} not found (train it with experiments/biased_shapes.py)")
        with open(path) as handle:
            history = json.load(handle)
        if history.get("status") != "finished":
            raise SystemExit(f"train_curves: {path} is not a finished run ({history.get('status')})")
        histories.append(history)
    return histories


def table(arm: str, histories: list[dict]) -> str:
    epochs = min(len(h["epochs"]) for h in histories)
    lines = [f"{arm} (mean over {len(histories)} seeds)",
             "| epoch | attention | L_cl | L_am | L_ext | validation mAP |", "|---|---|---|---|---|---|"]
    for index in range(epochs):
        rows = [h["epochs"][index] for h in histories]
        means = {key: np.mean([r["train"][key] for r in rows]) for key in ("cl", "am", "ex")}
        lines.append(f"| {rows[0]['epoch']} | {'on' if rows[0]['attention'] else 'off'} | {means['cl']:.3f} | "
                     f"{means['am']:.3f} | {means['ex']:.3f} | "
                     f"{np.mean([r['validation']['mAP'] for r in rows]):.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", nargs="+", required=True, help="arm names as in experiments/biased_shapes.py")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--logdir", default=os.path.join(REPO_ROOT, "runs", "biased_shapes"))
    args = parser.parse_args(argv)
    for arm in args.arms:
        print(table(arm, load(args.logdir, arm, args.seeds)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
