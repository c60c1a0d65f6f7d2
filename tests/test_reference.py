"""The closing table's "baseline trained as long" (gain_jax/train_loop/reference.py): its figures are the
committed default study's, they apply to train.py's default data and budget whatever the loss weights, and the
default configuration is the one that study's rule chose."""
import argparse
import dataclasses
import json
import os
import shlex
import types

import pytest

from gain_jax import config as run_config
from gain_jax.config import Config, DataConfig, GainConfig, TrainConfig
from gain_jax.train_loop import reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def committed_choice() -> dict:
    with open(os.path.join(ROOT, reference.SOURCE)) as handle:
        return json.load(handle)["default_choice"]


def test_the_figures_are_the_committed_studys_and_its_budget_is_train_pys_default():
    choice = committed_choice()
    assert choice["budget"]["seeds"] == list(reference.SEEDS)
    assert choice["budget"]["gain_shapes_version"] == "2.0.0" and Config().data.dataset == "gain_shapes"
    default = Config().train
    assert (choice["budget"]["epochs"], choice["budget"]["batch_size"]) == (default.epochs, default.batch_size)
    assert default.steps_per_epoch is None  # one pass, resolved by the run (RESOLVED)
    import gain_jax.data as gd  # what a run resolves the unset values to
    from gain_jax.data.shapes import SPLIT_SIZES

    assert reference.RESOLVED == {("data", "image_size"): gd.dataset_info("gain_shapes").image_size,
                                  ("train", "steps_per_epoch"): SPLIT_SIZES["train"] // default.batch_size}
    assert choice["budget"]["steps_per_epoch"] == reference.RESOLVED[("train", "steps_per_epoch")]
    stored = choice["baseline_trained_as_long"]
    assert set(stored) == set(reference.DEFAULT_BASELINE)
    for split, figures in stored.items():
        assert reference.DEFAULT_BASELINE[split] == pytest.approx(figures, abs=5e-4)  # kept to 3 decimals


def test_train_pys_default_is_the_arm_the_rule_chose():
    choice = committed_choice()
    parser = argparse.ArgumentParser()
    run_config.add_flags(parser)
    chosen = run_config.config_from_flags(parser.parse_args(choice["train_flags"]))

    def trained(gain):  # without attention mining its stream's settings train nothing
        return dataclasses.replace(gain, am_batchnorm="batch", score="sigmoid") if not gain.am_weight else gain

    assert trained(Config().gain) == trained(chosen.gain) and Config().data.ex_fraction == chosen.data.ex_fraction, (
        f"train.py's default is not the committed choice {choice['default']} ({shlex.join(choice['train_flags'])})")
    # --am_weight 0.1 gives the former default, GAIN_ext with attention mining as chosen on gain_shapes
    assert dataclasses.replace(Config().gain, am_weight=0.1) == GainConfig(
        am_weight=0.1, am_batchnorm="batch", score="sigmoid", ex_weight=1.0)


def test_the_baseline_applies_to_the_default_data_and_budget_only():
    assert reference.baseline_trained_as_long(Config()) == reference.DEFAULT_BASELINE
    other_weights = Config(gain=GainConfig(am_weight=1.0), train=TrainConfig(seed=3, pretrain_epochs=6))
    assert reference.baseline_trained_as_long(other_weights) == reference.DEFAULT_BASELINE
    resolved = Config(data=DataConfig(image_size=64), train=TrainConfig(steps_per_epoch=93))  # as a run holds it
    assert reference.baseline_trained_as_long(resolved) == reference.DEFAULT_BASELINE
    for changed in (Config(train=TrainConfig(epochs=12)), Config(train=TrainConfig(lr=3e-4)),
                    Config(data=DataConfig(dataset="gain_shapes:3.0.0")), Config(data=DataConfig(ex_oversample=0.5)),
                    Config(gain=GainConfig(cam="gradcam_pp")), Config(data=DataConfig(image_size=32)),
                    Config(train=TrainConfig(steps_per_epoch=50))):
        assert reference.baseline_trained_as_long(changed) is None


def test_the_default_runs_report_compares_with_the_baseline_not_its_pre_training():
    from gain_jax.train_loop.console import report

    paths = types.SimpleNamespace(run_dir="runs/x", metrics_path="runs/x/metrics.json",
                                  checkpoint_dir="runs/x/checkpoints", heatmap_dir="runs/x/heatmaps")
    figures = {"mAP": 0.5, "topk_accuracy": 0.4, "cam_mIoU": 0.6, "cam_object_mIoU": 0.5, "pointing_game": 0.9,
               "pointing_hits": 9, "pointing_trials": 10}
    history = {"epochs": [{"epoch": 2, "validation": figures, "validation_unbiased": figures}],
               "final": {"validation": figures, "validation_unbiased": figures}}
    for config, baseline in ((Config(), True), (Config(train=TrainConfig(epochs=3)), False)):
        run = types.SimpleNamespace(config=config, pointing_tolerance=4.0, paths=paths)
        lines = report(run, history, 10.0, 3).splitlines()
        assert any(line.startswith("validation_unbiased (baseline)") for line in lines) is baseline
        assert any("(pre-trained)" in line for line in lines) is not baseline
        if baseline:
            row = next(line for line in lines if line.startswith("validation_unbiased (baseline)"))
            assert f"{reference.DEFAULT_BASELINE['validation_unbiased']['mAP']:.3f}" in row
        else:
            assert any("not a fair baseline" in line and "--pretrain_epochs 3" in line for line in lines)
