"""GAIN's training loop as a library: `train_and_evaluate(config, workdir)` runs a whole training run.

    from gain_jax.config import Config, TrainConfig
    from gain_jax.train_loop import train_and_evaluate
    state, history = train_and_evaluate(Config(train=TrainConfig(epochs=2)), "runs/try")

A run writes, in its folder (`workdir`, by default <logdir>/<run_name>): config.json (the config, the facts
derived from the data set and the machine, and the library versions and git revision that ran it),
metrics.json (`history`: per-step losses, per-epoch evaluations, final results, status), TensorBoard events
(every scalar at the global step), heatmaps/*.png and checkpoints/ (Orbax).

Stopping: SIGINT/SIGTERM (or `StopRequest.request()`) set a flag checked between steps and at safe points
of the start-up; the run saves a checkpoint and returns with status "interrupted by SIGINT" (during the
start-up, before anything is written, it raises `RunInterrupted`). No signal ever raises inside native
code (XLA compilation, TensorFlow, Orbax): a second signal only says that the run is stopping, a third one
ends the process at once (exit 130) unless a checkpoint is being written, which always completes first.
In a multi-host run a signal to any process stops every process at the same step. A non-finite loss stops
the run with `NonFiniteLossError`, without saving the state after it.

Resuming: the newest checkpoint is restored; when it is unreadable (truncated or missing files) the run
says so in one line, restores the newest intact one instead and moves the unreadable ones aside
(<step>.corrupt).

The modules, one job each: `loop` (the loop and its one early exit), `stopping` (the signal policy; imports
neither JAX nor TensorFlow, so train.py installs it first), `setup` (checks, data set, model, run folder
layout), `devices` (placement, prefetch, multi-host agreement), `steps` (the train step and the loss
schedule), `batches`, `evaluation`, `records` (history, metrics.json, TensorBoard), `checkpoints` (save,
resume), `sweep` (a seed sweep's runs trained together, `--seeds`; one run is its N = 1 case), `console` (what a
run prints), `provenance` (versions, git revision). Importing this package
imports none of them: each loads on first use of one of its names.
"""
from __future__ import annotations

from gain_jax._lazy import lazy_attributes

__getattr__, __dir__, __all__ = lazy_attributes(__name__, {
    "loop": ("EndRun", "Loop", "NonFiniteLossError", "train_and_evaluate"),
    "stopping": ("StopRequest", "check_stop", "handle_signals", "install_handlers"),
    "setup": ("IMAGENET_MEAN", "IMAGENET_STD", "Position", "Run", "RunPaths", "check_environment",
              "config_file_record", "create_run", "create_train_state", "load_torch_state_dict", "resolve_config",
              "run_paths", "run_record"),
    "devices": ("Placement", "agree_to_stop", "batch_to_device", "data_parallel_placement", "prefetch_to_device",
                "rows_to_host"),
    "steps": ("LOSS_KEYS", "STEP_KEYS", "loss_switches", "make_loop_sweep_step", "make_loop_train_step",
              "mining_start_epoch", "phase_text", "schedule_text", "topk_accuracy", "trained_terms"),
    "batches": ("am_sampling_rng", "heatmap_batch", "pipeline", "prepare_train_batch",
                "selected_for_extra_supervision", "train_batches"),
    "evaluation": ("evaluate_split", "final_splits", "heatmap_picture"),
    "records": ("RunRecords", "log_scalars", "open_summary_writer", "step_means", "write_json_atomic"),
    "checkpoints": ("restore_run", "restore_runs", "save_checkpoint"),
    "sweep": ("Group", "create_group", "member_config", "sweep_config"),
    "console": ("method_name", "report", "summary_line"),
}, submodules=("provenance",))
