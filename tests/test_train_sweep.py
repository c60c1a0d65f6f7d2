"""A seed sweep (`--seeds`, gain_jax.train_loop.sweep): its flag and refusals, and tiny sweeps of 2 seeds on the
embedded gain_shapes set (batch 8, 2 steps per epoch, 2 epochs, 32x32 images) against the seeds' separate runs,
interrupted and resumed."""
import argparse
import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest
from test_train_cli import load_train_py

from gain_jax import config as run_config
from gain_jax.config import Config, ConfigError, DataConfig, EvalConfig, LogConfig, TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP_KEYS = ("loss", "cl", "am", "ex", "topk_accuracy")
SEEDS = (3, 5)


def parse(argv):
    parser = argparse.ArgumentParser()
    run_config.add_flags(parser)
    return run_config.config_from_flags(parser.parse_args(argv))


def tiny_config(data_dir, logdir, run_name, **train) -> Config:
    """GAIN_ext (--am_weight 0.1 on train.py's defaults): every stream of the step runs."""
    return Config(gain=dataclasses.replace(run_config.BENCHMARK_GAIN, am_weight=0.1),
                  data=DataConfig(data_dir=data_dir, image_size=32),
                  train=TrainConfig(batch_size=8, steps_per_epoch=2, epochs=2, pretrain_epochs=1, **train),
                  eval=EvalConfig(eval_examples=16),
                  log=LogConfig(logdir=str(logdir), run_name=run_name, num_heatmaps=2, log_every=1))


# ---------------------------------------------------------------------------------------------- the flag

def test_seeds_flag_parses_integers_and_round_trips_through_json():
    config = parse(["--seeds", "0,1,2,3,4", "--sweep_strategy", "vmap"])
    assert config.train.seeds == (0, 1, 2, 3, 4) and config.train.sweep_strategy == "vmap"
    assert parse(["--seeds", "7"]).train.seeds == (7,)
    assert parse([]).train.seeds is None  # one run of --seed
    assert parse(["--fill", "0.5"]).gain.fill == 0.5  # a float tuple field still takes one number
    assert run_config.config_from_dict(run_config.config_to_dict(config)) == config
    assert run_config.config_flags(config) == ["--seeds", "0,1,2,3,4", "--sweep_strategy", "vmap"]


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "0,1,0"], "--seeds must name at least one seed, each once, got '0,1,0'"),
    (["--seeds", "0,1", "--mode", "per_label"], "--seeds cannot train --mode per_label"),
    (["--seeds", "0,1", "--mode", "per_label", "--am_labels_per_image", "1"], "--seeds cannot train --mode per_label"),
])
def test_bad_seeds_raise_one_line_naming_the_flags(argv, message):
    with pytest.raises(ConfigError, match=message) as caught:
        parse(argv)
    assert "\n" not in str(caught.value)
    with pytest.raises(ConfigError, match="--seeds must name at least one seed"):
        Config(train=TrainConfig(seeds=())).validate()
    with pytest.raises(ConfigError, match="--seeds must be integers"):
        Config(train=TrainConfig(seeds=(0.5, 1.0))).validate()


def test_train_py_refuses_bad_seeds_in_one_line(capsys):
    train_py = load_train_py()
    assert train_py.main(["--seeds", "1,1"]) == train_py.EXIT_ERROR
    assert capsys.readouterr().err == "train.py: error: --seeds must name at least one seed, each once, got '1,1'\n"
    with pytest.raises(SystemExit):
        train_py.main(["--seeds", "a,b"])
    assert "argument --seeds: expected one number or comma-separated integers, got 'a,b'" in capsys.readouterr().err


def test_the_resume_hint_of_a_stopped_sweep_names_the_sweep():
    from gain_jax.train_loop import member_config, sweep_config

    member = member_config(Config(train=TrainConfig(seeds=SEEDS), log=LogConfig(logdir="runs", run_name="pair")), 3)
    histories = [{"global_step": 3, "paths": {"checkpoint_dir": f"runs/pair_seed{seed}/checkpoints"}} for seed in SEEDS]
    hint = load_train_py().resume_hint(sweep_config(member, SEEDS), "stopped after 3 steps", histories)
    assert hint == ("train.py: stopped after 3 steps at step 3: checkpoints saved in runs/pair_seed3/checkpoints, "
                    "runs/pair_seed5/checkpoints; continue with --resume --logdir runs --run_name pair --seeds 3,5")


def test_a_sweep_refuses_several_devices_before_anything_is_written(monkeypatch, tmp_path):
    from gain_jax.train_loop import sweep

    monkeypatch.setattr(sweep.jax, "device_count", lambda: 2)
    with pytest.raises(run_config.RunError, match="--seeds trains its runs on one device, this run has 2"):
        sweep.create_group(tiny_config(None, tmp_path, "multi", seeds=SEEDS))
    assert os.listdir(tmp_path) == []


def test_each_seed_is_the_run_its_seed_gives_in_its_own_folder():
    from gain_jax.train_loop import member_config, sweep_config

    sweep = Config(train=TrainConfig(seeds=SEEDS), log=LogConfig(run_name="five", checkpoint_dir="/ckpt/five"))
    member = member_config(sweep, 5)
    assert member.train.seed == 5 and member.train.seeds is None
    assert (member.log.run_name, member.log.checkpoint_dir) == ("five_seed5", "/ckpt/five_seed5")
    assert run_config.setting_differences(member, Config(train=TrainConfig(seed=5))) == []
    assert sweep_config(member, SEEDS).log == sweep.log and sweep_config(member, SEEDS).train.seeds == SEEDS


# ---------------------------------------------------------------------------------------------- tiny sweeps

@pytest.fixture(scope="module")
def separate_runs(shapes_data_dir, tmp_path_factory):
    """Each seed's run on its own: {seed: (state, history)}."""
    from gain_jax.train_loop import train_and_evaluate

    logdir = tmp_path_factory.mktemp("separate")
    return {seed: train_and_evaluate(tiny_config(shapes_data_dir, logdir, f"alone_seed{seed}", seed=seed))
            for seed in SEEDS}


def assert_equals_separate_runs(states, histories, separate_runs):
    """Per seed: the step records, evaluations and parameters of its separate run, to float32 rounding."""
    for seed, state, history in zip(SEEDS, states, histories):
        alone_state, alone = separate_runs[seed]
        assert history["status"] == "finished" and history["config"]["train"]["seed"] == seed
        assert [r["step"] for r in history["steps"]] == [r["step"] for r in alone["steps"]] == [1, 2, 3, 4]
        for key in STEP_KEYS:
            np.testing.assert_allclose([r[key] for r in history["steps"]], [r[key] for r in alone["steps"]],
                                       rtol=2e-5, atol=1e-6, err_msg=key)
        assert int(state.step) == 4
        for got, want in zip(jax.tree.leaves((state.params, state.batch_stats)),
                             jax.tree.leaves((alone_state.params, alone_state.batch_stats))):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        # the evaluations' continuous figures (CAM mIoU and pointing threshold the maps: a pixel at the threshold
        # may flip with float32 rounding)
        for split, result in alone["final"].items():
            for key in ("mAP", "topk_accuracy"):
                assert history["final"][split][key] == pytest.approx(result[key], abs=1e-6), (split, key)
            for key in ("loss", "cl", "am", "ex"):
                assert history["final"][split][key] == pytest.approx(result[key], rel=1e-5, abs=1e-7), (split, key)
    # the seeds differ, so the comparison above could fail
    assert histories[0]["steps"][0]["loss"] != histories[1]["steps"][0]["loss"]


def assert_each_seed_has_its_own_folder(logdir, run_name, histories):
    """<run_name>_seed<seed>/ per seed, nothing else: its metrics.json (the history returned), its config.json
    (the seed's own run), heatmaps and TensorBoard events."""
    assert sorted(os.listdir(logdir)) == [f"{run_name}_seed{seed}" for seed in SEEDS]
    for seed, history in zip(SEEDS, histories):
        run_dir = os.path.join(logdir, f"{run_name}_seed{seed}")
        assert history["paths"]["run_dir"] == run_dir
        with open(os.path.join(run_dir, "metrics.json")) as handle:
            assert json.dumps(json.load(handle), sort_keys=True) == json.dumps(history, sort_keys=True)
        with open(os.path.join(run_dir, "config.json")) as handle:
            record = json.load(handle)
        assert (record["train"]["seed"], record["train"]["seeds"], record["log"]["run_name"]) == (
            seed, None, f"{run_name}_seed{seed}")
        assert sorted(os.listdir(os.path.join(run_dir, "heatmaps"))) == ["step_0000002.png", "step_0000004.png"]
        assert any(name.startswith("events.out.tfevents") for name in os.listdir(run_dir))


@pytest.mark.slow
def test_an_interrupted_sweep_resumes_each_seed_from_its_own_checkpoint(shapes_data_dir, tmp_path, separate_runs,
                                                                        capsys):
    """Stopped after 3 of 4 steps (across the end of the classification-only epoch) and resumed, a sweep of the
    unrolled strategy has each seed's separate run, and each seed's records in its own folder. (One sweep serves
    both: the stopped invocation trains steps 1 to 3 as a sweep does from the start.)"""
    from gain_jax.train_loop import train_and_evaluate

    config = tiny_config(shapes_data_dir, tmp_path, "resumed", seeds=SEEDS, sweep_strategy="unrolled")
    _, stopped = train_and_evaluate(config, stop_after=3)
    assert [h["status"] for h in stopped] == ["stopped after 3 steps"] * 2
    checkpoints = [os.path.join(tmp_path, f"resumed_seed{seed}", "checkpoints") for seed in SEEDS]
    assert [sorted(os.listdir(folder)) for folder in checkpoints] == [["2", "3"], ["2", "3"]]
    # seeds whose newest checkpoints differ cannot continue together: refused before anything changes
    shutil.move(os.path.join(checkpoints[1], "3"), tmp_path / "aside")
    with pytest.raises(run_config.RunError, match="seed 3 at step 3, seed 5 at step 2"):
        train_and_evaluate(config, resume=True)
    shutil.move(tmp_path / "aside", os.path.join(checkpoints[1], "3"))
    capsys.readouterr()
    states, histories = train_and_evaluate(config, resume=True)
    assert_equals_separate_runs(states, histories, separate_runs)
    titles = [line for line in capsys.readouterr().out.splitlines() if " on gain_shapes, small_cnn, " in line]
    assert [title.split(":")[0] for title in titles] == [f"seed {seed}" for seed in SEEDS]  # whose report is whose
    assert_each_seed_has_its_own_folder(tmp_path, "resumed", histories)
    assert [sorted(os.listdir(folder)) for folder in checkpoints] == [["2", "3", "4"], ["2", "3", "4"]]
    # and one seed of the sweep is a run of its own: --seed 5 --run_name resumed_seed5 finds it finished
    alone = dataclasses.replace(config, train=dataclasses.replace(config.train, seeds=None, seed=5),
                                log=dataclasses.replace(config.log, run_name="resumed_seed5"))
    _, history = train_and_evaluate(alone, resume=True)
    assert history["global_step"] == 4 and history["steps"] == histories[1]["steps"]
