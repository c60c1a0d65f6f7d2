"""Evaluation records of trained runs for issue 20's protocol (experiments/biased_shapes.py's `select` and
`test` commands, experiments/probes/budget_curve.py): a run's checkpoint restored and evaluated on one split,
keeping what the intervals need per image.

    records = split_records(model, variables, gain_cfg, batches, num_classes)
    summary = summarize_records(records, cam_threshold=0.35)          # mAP, PxAP, CAM mIoU at that threshold
    stats.bootstrap_interval(map_statistic(records), len(records["scores"]), seed=0)

Records: "scores"/"targets" [N, C] (mAP), "conflicting" [N] (gain_shapes' bias-conflicting flag),
"pxap_positives"/"pxap_negatives" [N, T] (per image, summed over its label classes: PxAP pools them),
"iou" {threshold: counts of `gain_jax.evaluate.cam_counts` summed over the split} for CAM_THRESHOLDS.

Training, shared by biased_shapes.py and parts_study.py: `train_runs` trains one run, or several seeds of one arm
as one seed sweep (`--together`), in this process; `run_groups` and `sweep_batches` say in which order and groups.
"""
from __future__ import annotations

import contextlib
import os
import resource
import shlex
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from gain_jax import metrics
from gain_jax.evaluate import BATCH_KEYS, CONFLICTING_KEY, as_state, cam_counts

CAM_THRESHOLDS = tuple(round(0.05 * k, 2) for k in range(1, 20))  # 0.05 ... 0.95: the grid chosen on
POINTING_TOLERANCE = 15.0  # pixels, as train.py's evaluation


def split_records(model, variables, gain_cfg, batches: Iterable[Mapping[str, np.ndarray]], num_classes: int,
                  thresholds=CAM_THRESHOLDS, pointing_tolerance: float = POINTING_TOLERANCE) -> dict:
    """Evaluate `variables` on `batches` (host batches of `gain_jax.data.input_pipeline`, train=False)."""
    import jax.numpy as jnp

    from gain_jax.training import make_eval_step

    eval_step = make_eval_step(model, gain_cfg)
    state = as_state(variables)
    scores, targets, conflicting, positives, negatives = [], [], [], [], []
    iou = {threshold: None for threshold in thresholds}
    for batch in batches:
        out = eval_step(state, {key: jnp.asarray(np.asarray(batch[key])) for key in BATCH_KEYS})
        labels = np.asarray(batch["labels"])
        scores.append(np.asarray(out["logits"]))
        targets.append(labels)
        if CONFLICTING_KEY in batch:
            conflicting.append(np.asarray(batch[CONFLICTING_KEY], bool))
        cams, gt_masks = np.asarray(out["class_cams"]), np.asarray(batch["mask"])
        for row in range(len(labels)):  # PxAP counts per image: the bootstrap resamples images
            maps, masks = metrics.class_pixel_maps(cams[row:row + 1], labels[row:row + 1], gt_masks[row:row + 1])
            counts = metrics.pixel_score_counts(maps, masks)
            positives.append(counts[0])
            negatives.append(counts[1])
        for threshold in thresholds:
            counts = cam_counts(cams, labels, gt_masks, num_classes, threshold, pointing_tolerance)
            iou[threshold] = counts if iou[threshold] is None else {k: iou[threshold][k] + counts[k] for k in counts}
    if not scores:
        raise ValueError("no examples to evaluate")
    return {"scores": np.concatenate(scores), "targets": np.concatenate(targets),
            "conflicting": np.concatenate(conflicting) if conflicting else None,
            "pxap_positives": np.stack(positives), "pxap_negatives": np.stack(negatives), "iou": iou}


def cam_miou_by_threshold(records: dict) -> dict:
    """{threshold: CAM mIoU (background included, as train.py reports)} over the records' grid."""
    return {threshold: metrics.mean_iou(counts["intersection"], counts["union"])
            for threshold, counts in records["iou"].items()}


def summarize_records(records: dict, cam_threshold: float) -> dict:
    """mAP, mAP of the bias-conflicting images, PxAP, and at `cam_threshold` (one of the records' grid):
    CAM mIoU, CAM object mIoU, pointing game."""
    if cam_threshold not in records["iou"]:
        raise ValueError(f"threshold {cam_threshold} not in the evaluated grid {sorted(records['iou'])}")
    counts = records["iou"][cam_threshold]
    out = {"num_examples": int(len(records["scores"])),
           "mAP": metrics.mean_average_precision(records["scores"], records["targets"]),
           "PxAP": metrics.pixel_average_precision_from_counts(records["pxap_positives"].sum(0),
                                                               records["pxap_negatives"].sum(0)),
           "cam_threshold": float(cam_threshold),
           "cam_mIoU": metrics.mean_iou(counts["intersection"], counts["union"]),
           "cam_object_mIoU": metrics.object_mean_iou(counts["intersection"], counts["union"]),
           "pointing_game": counts["hits"] / counts["trials"] if counts["trials"] else float("nan")}
    if records["conflicting"] is not None:
        subset = records["conflicting"]
        out["num_conflicting"] = int(subset.sum())
        out["mAP_conflicting"] = (metrics.mean_average_precision(records["scores"][subset], records["targets"][subset])
                                  if subset.any() else float("nan"))
    return out


def map_statistic(records: dict):
    """mAP of the resampled images (for `gain_jax.stats.bootstrap_interval`)."""
    return lambda rows: metrics.mean_average_precision(records["scores"][rows], records["targets"][rows])


def pxap_statistic(records: dict):
    """PxAP of the resampled images' pooled pixel counts."""
    return lambda rows: metrics.pixel_average_precision_from_counts(records["pxap_positives"][rows].sum(0),
                                                                    records["pxap_negatives"][rows].sum(0))


def restore_run(run_dir: str, step: int | None = None) -> tuple[dict, int]:
    """(variables, step) of a run's checkpoint `step` (None: the newest) under <run_dir>/checkpoints."""
    from gain_jax import checkpoint

    directory = os.path.join(run_dir, "checkpoints")
    manager = checkpoint.open_manager(directory, create=False) if os.path.isdir(directory) else None
    steps = sorted(manager.all_steps()) if manager is not None else []
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {directory}")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise FileNotFoundError(f"no checkpoint step {step} in {directory} (steps: {steps})")
    return checkpoint.restore_variables(manager, step), step


def checkpoint_steps(run_dir: str) -> list[int]:
    """The saved steps of a run, oldest first."""
    from gain_jax import checkpoint

    directory = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted(checkpoint.open_manager(directory, create=False).all_steps())


# ---------------------------------------------------------------------------------------------- training

def process_cpu_seconds() -> float:
    """User + system CPU time of this process so far (all its threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_groups(arms: Sequence[str], seeds: Sequence[int], together: bool) -> list[tuple[str, list[int]]]:
    """[(arm, seeds)] in training order: one run at a time, every arm of the first seed first; or, `together`,
    each arm with all its seeds (those not reused are trained as one sweep, `sweep_batches`)."""
    if together:
        return [(arm, list(seeds)) for arm in arms]
    return [(arm, [seed]) for seed in seeds for arm in arms]


def sweep_refusal(config) -> str | None:
    """Why seeds of `config` (one run's) cannot be trained as one seed sweep; None when they can. The sweep's own
    checks (`gain_jax.config.check_seeds`: union mode only) and one device (`train_loop.sweep.create_group`)."""
    import dataclasses

    import jax

    from gain_jax import config as run_config

    try:
        run_config.check_seeds(dataclasses.replace(config, train=dataclasses.replace(config.train, seeds=(0, 1))))
    except run_config.ConfigError as error:
        return str(error)
    if jax.device_count() > 1:
        return f"a seed sweep trains on one device, this process has {jax.device_count()}"
    return None


def sweep_batches(arm: str, seeds: Sequence[int], config) -> list[list[int]]:
    """The seeds of `arm` to train (`config`: one of its runs'), as the groups `train_runs` trains: all of them as
    one sweep, or one at a time when there is one, or when `sweep_refusal(config)` (printed, with the reason)."""
    if len(seeds) < 2:
        return [list(seeds)] if seeds else []
    reason = sweep_refusal(config)
    if reason is None:
        return [list(seeds)]
    print(f"  {arm}: seeds {','.join(map(str, seeds))} trained one after another, not together: {reason}", flush=True)
    return [[seed] for seed in seeds]


def sweep_flags(flags: Sequence[str], seeds: Sequence[int]) -> list[str]:
    """train.py flags of one run (`--seed k --run_name <name>_seed<k>`) -> those of the sweep of `seeds` it is one
    of (`--seeds ... --run_name <name>`)."""
    from gain_jax.train_loop.sweep import seed_suffix

    flags = list(flags)
    at = flags.index("--seed")
    suffix = seed_suffix(int(flags[at + 1]))
    flags[at:at + 2] = ["--seeds", ",".join(map(str, seeds))]
    at = flags.index("--run_name") + 1
    flags[at] = flags[at].removesuffix(suffix)
    return flags


def train_runs(configs: Mapping[int, object], flags: Mapping[int, Sequence[str]], label: str
               ) -> tuple[dict[int, dict], float, float]:
    """Train the runs `configs` ({seed: its config}, runs of one arm: equal but for the seed and the run name
    <name>_seed<k>) in this process: one run through `train_and_evaluate`, several as one seed sweep (its config
    with `train.seeds`, run name <name>), whose seed k's folder, checkpoints and metrics.json are those its run
    alone writes (their results equal to float32 rounding, tests/test_train_sweep.py). An earlier folder of a run
    is removed first. Each run's output goes to <its folder>.log after the command that reruns it alone (`flags`:
    its train.py flags); a sweep's output, every seed's lines ("seed k: ..." for one seed's), is in each of its
    runs' logs after the sweep's command. ({seed: history}, wall s, CPU s of this process: user + system) of the
    whole call; SystemExit naming `label`, the seeds and the log when a run fails or does not finish."""
    from gain_jax.config import RunError
    from gain_jax.train_loop import train_and_evaluate
    from gain_jax.train_loop.sweep import member_config, sweep_config

    seeds = list(configs)
    folders = {seed: os.path.join(config.log.logdir, config.log.run_name) for seed, config in configs.items()}
    commands = {seed: shlex.join(["python", "train.py", *flags[seed]]) for seed in seeds}
    config, header = configs[seeds[0]], ""
    if len(seeds) > 1:
        config = sweep_config(configs[seeds[0]], seeds)
        for seed in seeds:  # the sweep trains exactly the runs asked for
            if member_config(config, seed) != configs[seed]:
                raise ValueError(f"{label}: seed {seed}'s run differs from seed {seeds[0]}'s in more than its seed "
                                 "and run name; it cannot be trained in their sweep")
        header = (f"# trained in one seed sweep with seeds {','.join(map(str, seeds))}; its output, every seed's: "
                  + shlex.join(["python", "train.py", *sweep_flags(flags[seeds[0]], seeds)])
                  + "\n")
    for directory in folders.values():
        if os.path.isdir(directory):
            print(f"  removing the unfinished or different earlier run {directory}", flush=True)
            shutil.rmtree(directory)
    os.makedirs(config.log.logdir, exist_ok=True)
    log_path = folders[seeds[0]] + ".log"
    what = f"{label} seed{'s' if len(seeds) > 1 else ''} {','.join(map(str, seeds))}"
    started, cpu_started = time.time(), process_cpu_seconds()
    with open(log_path, "w") as log:
        log.write(commands[seeds[0]] + "\n" + header)
        log.flush()
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                _, histories = train_and_evaluate(config)
        except RunError as error:
            raise SystemExit(f"{what} failed: {error}; log {log_path}") from None
    wall, cpu = time.time() - started, process_cpu_seconds() - cpu_started
    histories = dict(zip(seeds, histories)) if len(seeds) > 1 else {seeds[0]: histories}
    if len(seeds) > 1:
        with open(log_path) as handle:
            output = handle.read().split("\n", 2)[2]  # after the command and the header
        for seed in seeds[1:]:
            with open(folders[seed] + ".log", "w") as handle:
                handle.write(commands[seed] + "\n" + header + output)
    for seed, history in histories.items():
        if history["status"] != "finished":
            raise SystemExit(f"{label} seed {seed} {history['status']}; log {folders[seed]}.log")
    return histories, wall, cpu
