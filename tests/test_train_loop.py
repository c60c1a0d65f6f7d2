"""gain_jax.config and gain_jax.train_loop in-process: the config's JSON and flags, its checks, and tiny
training runs on the embedded gain_shapes set (batch 8, 2 steps per epoch, 2 epochs, 32x32 images)."""
import argparse
import dataclasses
import itertools
import json
import math
import os
import signal
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import gain_jax as gj
from gain_jax import config as run_config
from gain_jax import metrics
from gain_jax.config import Config, ConfigError, DataConfig, EvalConfig, LogConfig, TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP_KEYS = ("loss", "cl", "am", "ex", "topk_accuracy")


def parse(argv, base=None):
    parser = argparse.ArgumentParser()
    run_config.add_flags(parser)
    return run_config.config_from_flags(parser.parse_args(argv), base)


# ---------------------------------------------------------------------------------------------- config

def test_config_round_trips_through_json():
    config = Config(gain=gj.GainConfig(mode="per_label", fill=(0.1, 0.2, 0.3), cam="gradcam_pp", sigma=0.25),
                    data=DataConfig(image_size=48, autoaugment=True), train=TrainConfig(lr=1e-4, steps_per_epoch=7),
                    eval=EvalConfig(pointing_tolerance=3.0), log=LogConfig(run_name="x", log_every=4))
    payload = json.loads(json.dumps(run_config.config_to_dict(config)))
    assert list(payload) == ["gain", "data", "train", "eval", "log"]
    assert payload["gain"]["fill"] == [0.1, 0.2, 0.3] and payload["train"]["lr"] == 1e-4
    assert run_config.config_from_dict(payload) == config
    # derived facts beside the sections (config.json) are ignored; so is the flat layout of earlier runs read
    assert run_config.config_from_dict({**payload, "class_names": ["a"], "device_count": 2}) == config
    flat = run_config.config_from_dict({"backbone": "vgg16", "fill": "0", "image_size": 224, "class_names": ["a"]})
    assert (flat.train.backbone, flat.gain.fill, flat.data.image_size) == ("vgg16", 0.0, 224)


def test_defaults_are_the_benchmark_mask_loss_and_saved_runs_read_as_trained(tmp_path):
    # train.py's defaults: the mask loss alone, chosen at the default's budget (attention mining's settings as
    # chosen on gain_shapes, for --am_weight 0.1); GainConfig() stays upstream's
    assert Config().gain == run_config.BENCHMARK_GAIN == gj.GainConfig(
        am_weight=0.0, am_batchnorm="batch", score="sigmoid", ex_weight=1.0)
    assert (Config().data.ex_fraction, Config().train.epochs, Config().train.pretrain_epochs) == (1.0, 6, 2)
    upstream = parse(["--am_weight", "1", "--am_batchnorm", "frozen", "--score", "softmax", "--ex_weight", "0"])
    assert upstream.gain == gj.GainConfig()
    # a record written before a gain field existed trained with GainConfig()'s value, not train.py's default
    old = {"gain": {"mode": "union", "am_weight": 1.0, "ex_weight": 0.0}, "train": {"backbone": "small_cnn"}}
    assert run_config.config_from_saved(old).gain == gj.GainConfig()
    assert run_config.config_from_saved({"am_weight": 1.0}).gain == gj.GainConfig()  # the flat layout
    path = tmp_path / "config.json"
    path.write_text(json.dumps(old))
    assert run_config.load_config(str(path)).gain == gj.GainConfig()
    # a complete record (every config.json train_loop writes) reads back as it is, defaults included
    payload = run_config.config_to_dict(Config())
    path.write_text(json.dumps(payload))
    assert run_config.config_from_saved(payload) == run_config.load_config(str(path)) == Config()


def test_every_field_of_every_section_is_a_flag_with_help_and_default(capsys):
    parser = argparse.ArgumentParser()
    run_config.add_flags(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for section in run_config.sections(Config()).values():
        for field in dataclasses.fields(section):
            assert f"--{field.name}" in text, field.name
            assert " ".join(field.metadata["help"].split()) in text, field.name
    assert "--lr LR Adam learning rate" in text and "(default: 0.001)" in text
    assert "--autoaugment, --no-autoaugment" in text
    assert "{gradcam,gradcam_pp," in text  # a registry's names as choices


def test_flags_override_only_what_is_given():
    base = Config(train=TrainConfig(lr=0.5, epochs=9), gain=gj.GainConfig(sigma=0.3))
    config = parse(["--lr", "1e-4", "--fill", "0.1,0.2,0.3", "--autoaugment", "--max_labels", "2"], base)
    assert config.train.lr == 1e-4 and config.train.epochs == 9 and config.gain.sigma == 0.3
    assert config.gain.fill == (0.1, 0.2, 0.3) and config.data.autoaugment and config.gain.max_labels == 2
    assert parse([]) == Config()
    assert parse(["--fill", "0.5"]).gain.fill == 0.5


@pytest.mark.parametrize("argv, message", [
    (["--sigma", "-1"], "--sigma must be in [0, 1], got -1.0"),
    (["--batch_size", "0"], "--batch_size must be >= 1, got 0"),
    (["--ex_fraction", "2"], "--ex_fraction must be in [0, 1], got 2.0"),
    (["--steps_per_epoch", "0"], "--steps_per_epoch must be >= 1, got 0"),
    (["--log_every", "0"], "--log_every must be >= 1, got 0"),
    (["--num_heatmaps", "9", "--batch_size", "8"], "--num_heatmaps 9 exceeds --batch_size 8"),
    (["--fill", "1,2"], "--fill must be a scalar or 3 values"),
    (["--dataset", "gain_voc2012"], "gain_voc2012 needs --manual_dir"),
    (["--backbone", "vgg16", "--image_size", "16"],
     "--image_size 16 is too small for --backbone vgg16: its Grad-CAM layer would be 0 cells wide; use at least 64"),
    (["--fill", "nan"], "--fill must be finite"),
    (["--am_start_epoch", "-1"], "--am_start_epoch must be >= 0, got -1"),
    (["--am_start_epoch", "1", "--pretrain_epochs", "2"],
     "--am_start_epoch must be 0 or in [--pretrain_epochs 2, --epochs 6], got 1"),
    (["--am_start_epoch", "7"], "--am_start_epoch must be 0 or in [--pretrain_epochs 2, --epochs 6], got 7"),
    (["--ex_oversample", "0.5", "--ex_fraction", "0"],
     "--ex_oversample 0.5 draws again from the images that --ex_fraction selects: it needs --ex_fraction > 0"),
    (["--ex_oversample", "1"], "--ex_oversample must be in [0, 0.99], got 1.0"),
])
def test_invalid_values_raise_config_error_naming_the_flag(argv, message):
    with pytest.raises(ConfigError) as raised:
        parse(argv)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_am_start_epoch_delays_attention_mining_alone():
    from gain_jax.train_loop import loss_switches, phase_text, schedule_text

    assert [parse(["--am_start_epoch", str(n)]).train.am_start_epoch for n in (0, 2, 4, 6)] == [0, 2, 4, 6]
    assert parse(["--am_start_epoch", "0", "--pretrain_epochs", "9"]).train.am_start_epoch == 0

    def switches(train):
        return [tuple(float(on) for on in loss_switches(train, epoch)) for epoch in range(train.epochs)]

    off, mask_loss, both = (0.0, 0.0), (1.0, 0.0), (1.0, 1.0)
    assert switches(TrainConfig()) == switches(TrainConfig(am_start_epoch=2)) == [off] * 2 + [both] * 4
    assert switches(TrainConfig(am_start_epoch=4)) == [off] * 2 + [mask_loss] * 2 + [both] * 2
    assert switches(TrainConfig(am_start_epoch=6)) == [off] * 2 + [mask_loss] * 4
    assert all(type(on) is np.float32 for on in loss_switches(TrainConfig(), 0))  # the step's traced dtype

    def run(am_weight=0.1, ex_weight=1.0, **train):  # GAIN_ext by default (train.py's default trains no L_am)
        default = Config()
        return dataclasses.replace(default, train=TrainConfig(**train), gain=dataclasses.replace(
            default.gain, am_weight=am_weight, ex_weight=ex_weight))

    assert schedule_text(run()) == "attention mining from epoch 3"
    assert schedule_text(run(am_start_epoch=4)) == ("extra supervision (L_ext) from epoch 3, "
                                                    "attention mining (L_am) from epoch 5")
    # L_am switched on after the last epoch is not trained: the run is the mask loss alone
    assert schedule_text(run(am_start_epoch=6)) == "the mask loss (L_ext) from epoch 3"
    assert [phase_text(run(am_start_epoch=4), epoch) for epoch in (1, 2, 4)] == [
        "", " (L_ext, L_am not yet)", " (attention mining)"]
    # what the run trains decides what is named: the mask loss alone, the baseline
    assert schedule_text(Config()) == schedule_text(run(am_weight=0)) == "the mask loss (L_ext) from epoch 3"
    assert schedule_text(run(am_weight=0, ex_weight=0)) == "classification only"
    assert phase_text(run(am_weight=0), 2) == " (L_ext)" and phase_text(run(am_weight=0), 1) == ""
    assert phase_text(run(am_weight=0, ex_weight=0), 2) == ""


def test_config_from_dict_checks_names_and_validate_checks_choices():
    with pytest.raises(ConfigError, match="unknown setting 'lr_typo' in config section 'train'"):
        run_config.config_from_dict({"train": {"lr_typo": 1}})
    with pytest.raises(ConfigError, match="--backbone must be one of .*small_cnn.*, got 'vgg99'"):
        run_config.config_from_dict({"train": {"backbone": "vgg99"}}).validate()
    with pytest.raises(ConfigError, match="--batch_size must be int, got '8'"):
        run_config.config_from_dict({"train": {"batch_size": "8"}}).validate()
    with pytest.raises(ConfigError, match="--cam must be one of"):
        run_config.config_from_dict({"gain": {"cam": "nope"}})


def test_resume_must_match_fields_come_from_metadata():
    must_match = {name for _, name in run_config.must_match_fields()}
    assert must_match == {"dataset", "backbone", "image_size", "batch_size", "mode", "max_labels", "seed",
                          "autoaugment", "train_split"}
    saved = run_config.config_to_dict(Config())
    assert run_config.resume_mismatches(saved, Config(train=TrainConfig(lr=0.1))) == []
    assert run_config.resume_mismatches(saved, Config(train=TrainConfig(seed=3))) == [("seed", 0, 3)]
    assert run_config.resume_mismatches({"seed": 1}, Config()) == [("seed", 1, 0)]  # the flat layout
    # a checkpoint saved before a must-match setting existed trained with its default
    del saved["data"]["train_split"]
    assert run_config.resume_mismatches(saved, Config()) == []
    assert run_config.resume_mismatches(saved, Config(data=DataConfig(train_split="validation"))) == [
        ("train_split", "train", "validation")]


def test_changed_settings_name_what_a_resume_changes():
    saved = run_config.config_to_dict(Config())
    assert run_config.changed_settings(saved, Config()) == []
    assert run_config.changed_settings(saved, Config(train=TrainConfig(lr=0.1))) == [("lr", 0.001, 0.1)]
    # a run saved before a gain field existed trained with GainConfig()'s value, which train.py's default changed
    del saved["gain"]["score"]
    assert ("score", "softmax", "sigmoid") in run_config.changed_settings(saved, Config())
    # where things are is not a setting
    moved = run_config.config_to_dict(Config(log=LogConfig(logdir="elsewhere")))
    assert run_config.changed_settings(moved, Config()) == []


@pytest.mark.slow  # three GAIN programs compiled
def test_epochs_where_l_am_weighs_0_train_without_the_attention_mining_stream():
    """The loop's step in a classification-only epoch (mining_on 0): the update of the whole GAIN step with
    L_am weighted 0, to float32 rounding, without computing L_am (NaN); with mining_on 1 the whole step."""
    import jax
    import optax

    from gain_jax.train_loop import make_loop_train_step

    model = gj.build_model("small_cnn", 3, dropout_rate=0.0)
    images = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 3))
    batch = {"image": images, "labels": jnp.eye(3)[jnp.array([0, 1, 2, 0])]}
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), images)  # the same values, cheaper than op by op
    cfg = gj.GainConfig(am_weight=0.5, ex_weight=0.0)
    whole = gj.make_train_step(model, cfg, donate=False)
    loop_step = make_loop_train_step(model, cfg)
    key = jax.random.PRNGKey(2)
    for attention_on, mining_on in ((0.0, 0.0), (1.0, 0.0), (1.0, 1.0)):
        state = gj.create_train_state(variables, optax.sgd(1.0))
        want_state, want = whole(state, batch, jax.random.fold_in(key, 7), np.float32(attention_on),
                                 np.float32(mining_on))
        state = gj.create_train_state(jax.tree.map(jnp.copy, variables), optax.sgd(1.0))  # the loop donates it
        got_state, got = loop_step(state, batch, key, 7, np.float32(attention_on), np.float32(mining_on))
        assert math.isnan(float(got["am"])) == (not mining_on) and math.isfinite(float(want["am"]))
        np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-6)
        for got_leaf, want_leaf in zip(jax.tree_util.tree_leaves((got_state.params, got_state.batch_stats)),
                                       jax.tree_util.tree_leaves((want_state.params, want_state.batch_stats))):
            np.testing.assert_allclose(got_leaf, want_leaf, rtol=1e-5, atol=1e-6)


def test_device_topk_accuracy_matches_the_host_metric():
    from gain_jax.train_loop import topk_accuracy

    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, (64, 6)).astype(np.float32)  # many ties: the stable ranking decides
    targets = (rng.random((64, 6)) < 0.3).astype(np.float32)
    targets[:5] = 0  # images without labels count for nothing
    assert float(topk_accuracy(jnp.asarray(scores), jnp.asarray(targets))) == pytest.approx(
        metrics.topk_accuracy(scores, targets), abs=1e-6)
    assert np.isnan(float(topk_accuracy(jnp.asarray(scores), jnp.zeros_like(jnp.asarray(targets)))))


def test_signals_never_raise_and_a_third_waits_for_a_checkpoint_being_written(capsys, monkeypatch):
    from gain_jax import train_loop
    from gain_jax.train_loop import stopping

    exits = []
    monkeypatch.setattr(stopping.os, "_exit", exits.append)
    stop = train_loop.StopRequest()
    stop.training = True
    stop(signal.SIGTERM, None)
    assert stop.signal_name == "SIGTERM"
    with stop.protect():
        stop(signal.SIGINT, None)
        stop(signal.SIGINT, None)  # a third signal: deferred, the block goes on
        finished = True
    assert finished and exits == [] and "stopping once it is complete" in capsys.readouterr().err
    stop(signal.SIGINT, None)  # outside a protected block: the process ends at once, no exception
    assert exits == [130] and "quitting at once" in capsys.readouterr().err
    second = train_loop.StopRequest()
    second(signal.SIGINT, None)
    second(signal.SIGINT, None)
    assert exits == [130] and "already stopping" in capsys.readouterr().err


def test_prefetch_to_device_transfers_ahead_and_keeps_the_order():
    from gain_jax.train_loop import data_parallel_placement, prefetch_to_device

    pulled = []

    def batches():
        for index in range(5):
            pulled.append(index)
            yield {"image": np.full((2, 4, 4, 3), index, np.float32), "labels": np.zeros((2, 3), np.float32),
                   "mask": np.zeros((2, 4, 4), np.uint8), "has_mask": np.zeros(2, bool)}

    stream = prefetch_to_device(data_parallel_placement(), batches(), depth=2)
    first = next(stream)
    assert pulled == [0, 1]  # the next batch is on its way while the first is used
    assert [int(first["image"][0, 0, 0, 0])] + [int(b["image"][0, 0, 0, 0]) for b in stream] == [0, 1, 2, 3, 4]


@pytest.mark.slow
def test_library_modules_import_neither_tensorflow_nor_torch():
    code = ("import sys, gain_jax.config, gain_jax.train_loop, gain_jax.evaluate, gain_jax.explain\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'torch'))[:3])")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr[-2000:]


# ---------------------------------------------------------------------------------------------- runs

def tiny_config(data_dir, logdir, run_name, **log_changes) -> Config:
    """GAIN_ext (--am_weight 0.1 on train.py's defaults): every stream of the step runs."""
    return Config(gain=dataclasses.replace(run_config.BENCHMARK_GAIN, am_weight=0.1),
                  data=DataConfig(data_dir=data_dir, image_size=32),
                  train=TrainConfig(batch_size=8, steps_per_epoch=2, epochs=2, pretrain_epochs=1),
                  eval=EvalConfig(eval_examples=16),
                  log=LogConfig(**{"logdir": str(logdir), "run_name": run_name, "num_heatmaps": 2, **log_changes}))


@pytest.fixture
def small_shapes_data_dir(tmp_path, monkeypatch):
    """gain_shapes with splits of 32 and 16 images, built in this test's folder (0.4 s): the fast tier's tests here
    need no more, and the session's full build (`shapes_data_dir`, 4,800 images, 16 s) then waits for the slow
    tier. The builder reads the sizes at generation time."""
    import gain_jax.data as gd
    from gain_jax.data import shapes

    monkeypatch.setattr(shapes, "SPLIT_SIZES", {"train": 32, "validation": 16, "validation_unbiased": 16,
                                                "test_unbiased": 16})
    data_dir = str(tmp_path / "tfds")
    gd.make_dataset("gain_shapes", "train", data_dir=data_dir, batch_size=1, train=False)
    return data_dir


@pytest.fixture(scope="module")
def every_step_run(shapes_data_dir, tmp_path_factory):
    """Step metrics read back after every step."""
    from gain_jax.train_loop import train_and_evaluate

    config = tiny_config(shapes_data_dir, tmp_path_factory.mktemp("runs"), "every_step", log_every=1)
    return train_and_evaluate(config)


@pytest.mark.slow
def test_history_is_metrics_json_and_config_json_holds_the_resolved_config(every_step_run):
    state, history = every_step_run
    assert int(state.step) == 4
    assert history["status"] == "finished" and history["global_step"] == 4
    assert [r["step"] for r in history["steps"]] == [1, 2, 3, 4]
    assert [r["attention"] for r in history["steps"]] == [False, False, True, True]
    assert [r["epoch"] for r in history["epochs"]] == [1, 2]
    assert history["epochs"][0]["steps_per_second"] > 0
    assert list(history["final"]) == ["validation", "validation_unbiased"]  # test_unbiased only with eval.test
    assert "validation_unbiased" in history["epochs"][0] and "test_unbiased" not in history["epochs"][0]
    run_dir = history["paths"]["run_dir"]
    with open(os.path.join(run_dir, "metrics.json")) as handle:
        assert json.dumps(json.load(handle), sort_keys=True) == json.dumps(history, sort_keys=True)
    with open(os.path.join(run_dir, "config.json")) as handle:
        record = json.load(handle)
    assert record == history["config"]
    assert record["class_names"] == ["circle", "square", "triangle", "cross", "ring", "diamond"]
    assert record["device_count"] == 1 and record["pointing_tolerance_px"] == 2
    resolved = run_config.config_from_dict(record)
    assert resolved.train.steps_per_epoch == 2 and resolved.data.image_size == 32 and resolved.log.log_every == 1
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["2", "4"]
    assert sorted(os.listdir(os.path.join(run_dir, "heatmaps"))) == ["step_0000002.png", "step_0000004.png"]


@pytest.mark.slow
def test_metrics_read_back_every_n_steps_equal_the_per_step_values(every_step_run, shapes_data_dir, tmp_path):
    from gain_jax.train_loop import train_and_evaluate

    workdir = tmp_path / "every_3rd"
    _, history = train_and_evaluate(tiny_config(shapes_data_dir, "ignored", None, log_every=3), str(workdir))
    assert history["paths"]["run_dir"] == str(workdir)
    assert history["config"]["log"]["run_name"] == "every_3rd"
    reference = every_step_run[1]["steps"]
    # the same program and batches: bit-identical, whenever they are read back (array_equal: "am" is NaN in
    # both where L_am weighs 0, and NaN != NaN in a comparison of dicts)
    np.testing.assert_array_equal([[r[k] for k in STEP_KEYS] for r in history["steps"]],
                                  [[r[k] for k in STEP_KEYS] for r in reference])


@pytest.mark.slow
def test_evaluate_from_a_notebook_matches_the_runs_final_validation(every_step_run, shapes_data_dir):
    import gain_jax.data as gd
    from gain_jax.data import shapes
    from gain_jax.evaluate import evaluate

    state, history = every_step_run
    config = run_config.config_from_dict(history["config"])
    model = gj.build_model("small_cnn", num_classes=6, dropout_rate=config.train.dropout)
    batches = gd.input_pipeline("gain_shapes", "validation[:16]", data_dir=shapes_data_dir, image_size=32,
                                batch_size=8, train=False)
    result = evaluate(model, state.variables, batches, config.gain, history["config"]["class_names"],
                      cam_threshold=0.5, pointing_tolerance=2)
    final = history["final"]["validation"]
    for key in ("num_examples", "mAP", "topk_accuracy", "cam_mIoU", "pointing_game", "pointing_trials",
                "cam_object_mIoU", "num_conflicting", "mAP_conflicting"):
        assert result[key] == pytest.approx(final[key], abs=1e-6), key
    names = [n.decode() for b in gd.input_pipeline("gain_shapes", "validation[:16]", data_dir=shapes_data_dir,
                                                   image_size=32, batch_size=8, train=False) for n in b["filename"]]
    examples = [shapes.generate_example("validation", int(name.rsplit("_", 1)[1])) for name in names]
    conflicting = [e["labels"][e["background"]] == 0 for e in examples]  # texture of a non-label class
    assert 0 < final["num_conflicting"] == sum(conflicting) < 16
    assert result["floors"] == final["floors"] and set(final["floors"]) == set(metrics.FLOOR_NAMES)
    for key in ("loss", "cl", "am", "ex"):
        assert result[key] == pytest.approx(final[key], rel=1e-5, abs=1e-7), key


@pytest.mark.slow
def test_a_stop_request_saves_at_the_step_boundary(shapes_data_dir, tmp_path):
    from gain_jax.train_loop import StopRequest, train_and_evaluate

    stop = StopRequest()
    stop.request("a test")
    with pytest.raises(run_config.RunInterrupted, match="before training: nothing written"):
        train_and_evaluate(tiny_config(shapes_data_dir, tmp_path, "stopped"), stop_request=stop)
    assert not os.path.exists(os.path.join(tmp_path, "stopped"))
    stop = StopRequest()
    _, history = train_and_evaluate(tiny_config(shapes_data_dir, tmp_path, "stopped"), stop_request=stop,
                                    stop_after=1)
    assert history["status"] == "stopped after 1 steps" and history["global_step"] == 1
    assert os.listdir(os.path.join(tmp_path, "stopped", "checkpoints")) == ["1"]


@pytest.mark.slow
def test_run_errors_are_raised_before_anything_is_written(shapes_data_dir, tmp_path):
    from gain_jax.train_loop import train_and_evaluate

    config = tiny_config(shapes_data_dir, tmp_path, "bad")
    missing = str(tmp_path / "nowhere")
    with pytest.raises(run_config.RunError, match="data dir .*nowhere does not exist"):
        train_and_evaluate(dataclasses.replace(config, data=dataclasses.replace(config.data, data_dir=missing)))
    with pytest.raises(ConfigError, match="--keep must be >= 1, got 0"):
        train_and_evaluate(dataclasses.replace(config, log=dataclasses.replace(config.log, keep=0)))
    with pytest.raises(run_config.RunError, match="--resume needs the --run_name"):
        train_and_evaluate(dataclasses.replace(config, log=dataclasses.replace(config.log, run_name=None)),
                           resume=True)
    assert not os.path.exists(os.path.join(tmp_path, "bad"))


@pytest.mark.slow
def test_per_label_runs_pack_images_with_more_labels_than_max_labels(shapes_data_dir, tmp_path):
    """gain_shapes images carry up to 3 labels; packed per-label training refuses none at --max_labels 1."""
    from gain_jax.train_loop import train_and_evaluate

    config = tiny_config(shapes_data_dir, tmp_path, "per_label")
    config = dataclasses.replace(config, gain=dataclasses.replace(config.gain, mode="per_label", max_labels=1))
    _, history = train_and_evaluate(config)
    assert history["status"] == "finished"
    attention_steps = [record for record in history["steps"] if record["attention"]]
    assert attention_steps and all(np.isfinite(record["am"]) and record["am"] > 0 for record in attention_steps)


@pytest.mark.slow
def test_am_start_epoch_run_trains_the_mask_loss_alone_first_and_resumes_on_schedule(shapes_data_dir, tmp_path):
    """--pretrain_epochs 1 --am_start_epoch 2 --epochs 3: epoch 1 classification, epoch 2 L_cl + L_ext, epoch
    3 everything; stopped mid-epoch 2 and resumed, the epoch decides the switches again."""
    from gain_jax.train_loop import train_and_evaluate

    config = tiny_config(shapes_data_dir, tmp_path, "delayed", log_every=1)
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, epochs=3, am_start_epoch=2))
    _, first = train_and_evaluate(config, stop_after=3)
    assert first["status"] == "stopped after 3 steps"
    _, history = train_and_evaluate(config, resume=True)
    assert history["status"] == "finished" and [r["step"] for r in history["steps"]] == [1, 2, 3, 4, 5, 6]
    assert [r["attention"] for r in history["steps"]] == [False] * 2 + [True] * 4
    assert [r["mining"] for r in history["steps"]] == [False] * 4 + [True] * 2
    assert [(r["attention"], r["mining"]) for r in history["epochs"]] == [(False, False), (True, False), (True, True)]
    gain = config.gain  # train.py's default GAIN_ext: both weights non-zero
    assert gain.am_weight > 0 and gain.ex_weight > 0
    for record in history["steps"]:
        am_term = gain.am_weight * record["am"] if record["mining"] else 0.0
        ex_weight = gain.ex_weight if record["attention"] else 0.0
        want = gain.cl_weight * record["cl"] + am_term + ex_weight * record["ex"]
        assert record["loss"] == pytest.approx(want, rel=1e-5), record["step"]
    # L_am is computed only where it counts: the other epochs run without the attention-mining stream
    assert all(record["am"] > 0 if record["mining"] else math.isnan(record["am"]) for record in history["steps"])


@pytest.mark.slow
def test_ex_oversample_puts_more_of_the_few_masks_in_each_batch(shapes_data_dir, tmp_path):
    """--ex_fraction 0.1: about 10% of a batch's images feed the mask loss; --ex_oversample 0.5 draws half of
    the examples again from those images (about 0.5 + 0.5 * 0.1), the same ones, deterministically."""
    from gain_jax.train_loop import create_run, selected_for_extra_supervision, train_batches

    def mask_share(oversample, epoch=0):
        config = tiny_config(shapes_data_dir, tmp_path, f"oversample_{oversample}")
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, ex_fraction=0.1,
                                                                      ex_oversample=oversample))
        batches = list(itertools.islice(train_batches(create_run(config), epoch), 10))
        names = [name.decode() for batch in batches for name in batch["filename"]]
        has_mask = np.concatenate([batch["has_mask"] for batch in batches])
        # the images that come with a mask are exactly --ex_fraction's selection
        np.testing.assert_array_equal(has_mask, selected_for_extra_supervision(names, 0, 0.1))
        return has_mask.mean(), names

    plain, _ = mask_share(0.0)
    oversampled, names = mask_share(0.5)
    assert plain < 0.25 and 0.4 < oversampled < 0.75, (plain, oversampled)
    assert mask_share(0.5)[1] == names  # deterministic from the seed
    assert mask_share(0.5, epoch=1)[1] != names
    # no image selected: one line naming the flag, before any step
    config = tiny_config(shapes_data_dir, tmp_path, "oversample_none")
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, ex_fraction=1e-9, ex_oversample=0.5))
    message = r"--ex_oversample 0.5: oversample: the filter selects none of the \d+ images"
    with pytest.raises(run_config.RunError, match=message):
        train_batches(create_run(config), 0)


def test_train_split_chooses_the_split_trained_on(small_shapes_data_dir, tmp_path):
    """--train_split: the batches come from that split and an epoch is one pass over it; a split the data set
    lacks is refused in one line naming the flag and the splits there are."""
    from gain_jax.train_loop import create_run, train_batches

    def run_of(split):
        config = tiny_config(small_shapes_data_dir, tmp_path, f"split_{split}")
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, train_split=split),
                                     train=dataclasses.replace(config.train, steps_per_epoch=None))
        return create_run(config)

    run = run_of("validation")
    assert run.config.train.steps_per_epoch == run.split_sizes["validation"] // 8 != run.split_sizes["train"] // 8
    names = {name.decode() for batch in itertools.islice(train_batches(run, 0), 3) for name in batch["filename"]}
    assert names and all(name.startswith("shapes_validation_") for name in names), sorted(names)[:3]
    with pytest.raises(ConfigError, match=r"^--train_split 'train_unbiased': gain_shapes has the splits "
                                          r"test_unbiased, train, validation, validation_unbiased$"):
        run_of("train_unbiased")


# ---------------------------------------------------------------------------------------------- what a user sees

def scalar_steps(run_dir) -> dict:
    """{TensorBoard scalar tag: [steps it was written at]} of a run folder's event files."""
    import tensorflow as tf

    steps: dict = {}
    for name in sorted(os.listdir(run_dir)):
        if name.startswith("events.out.tfevents"):
            for event in tf.compat.v1.train.summary_iterator(os.path.join(run_dir, name)):
                for value in event.summary.value:
                    if value.metadata.plugin_data.plugin_name == "scalars":
                        steps.setdefault(value.tag, []).append(event.step)
    return steps


@pytest.mark.slow  # every_step_run trains a run (18 s); the fast tier trains one in the progress test
def test_every_tensorboard_scalar_is_at_the_global_step(every_step_run):
    _, history = every_step_run
    steps = scalar_steps(history["paths"]["run_dir"])
    # 2 epochs x 2 steps: each epoch ends at global step 2 and 4; pre-training (1 epoch) ends at step 2
    assert steps["train/loss"] == steps["train/ex"] == [1, 2, 3, 4]
    assert steps["epoch_train/loss"] == steps["epoch_train/ex"] == [2, 4]
    assert steps["validation/mAP"] == [2, 4]  # the final validation is the last epoch's, written once
    assert steps["validation_unbiased/mAP"] == [2, 4]  # after pre-training, then at the end
    assert {step for tag_steps in steps.values() for step in tag_steps} <= {1, 2, 3, 4}


@pytest.mark.slow  # every_step_run trains a run (18 s); the fast tier trains one in the progress test
def test_config_json_records_the_library_versions_and_the_git_revision(every_step_run, tmp_path):
    import importlib.metadata

    from gain_jax.train_loop import provenance

    _, history = every_step_run
    with open(os.path.join(history["paths"]["run_dir"], "config.json")) as handle:
        environment = json.load(handle)["environment"]
    versions = environment["versions"]
    for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tensorflow-datasets", "torch"):
        assert versions[name] == importlib.metadata.version(name), name
    assert versions["tensorflow"] not in ("", "unknown")
    revision = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True)
    if revision.returncode == 0:  # the tests run from a checkout
        assert environment["git"]["revision"] == revision.stdout.strip()
        assert isinstance(environment["git"]["dirty"], bool)
    assert provenance.git_revision(str(tmp_path)) is None  # not a checkout: nothing, no error
    # the checkpoints' record is what it was before the environment was recorded
    from gain_jax import checkpoint

    manager = checkpoint.open_manager(history["paths"]["checkpoint_dir"], create=False)
    try:
        saved = checkpoint.read_meta(manager, 4)["config"]
    finally:
        manager.close()
    assert "environment" not in saved and saved == {k: v for k, v in history["config"].items() if k != "environment"}


def test_versions_and_stopping_import_neither_torch_nor_jax():
    code = ("import sys\n"
            "from gain_jax.train_loop import stopping\n"
            "assert 'jax' not in sys.modules, 'stopping imports jax'\n"
            "from gain_jax.train_loop import provenance\n"
            "versions = provenance.library_versions()\n"
            "assert 'torch' in versions and 'torch' not in sys.modules\n"
            "print('ok')\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "ok", result.stdout + result.stderr[-2000:]


def test_the_report_names_what_was_trained():
    from gain_jax.train_loop import method_name

    def named(**gain):
        config = Config(gain=dataclasses.replace(Config().gain, **gain))
        return method_name(config)

    assert named() == "mask loss alone, L_cl + L_ext (union)"  # train.py's default: am_weight 0, ex_weight 1
    assert named(am_weight=0.1) == "GAIN_ext (union)"
    assert named(am_weight=0.1, ex_weight=0.0) == "GAIN (union)"
    assert named(am_weight=0.0, mode="per_label") == "mask loss alone, L_cl + L_ext (per_label)"
    assert named(am_weight=0.0, ex_weight=0.0) == "classification baseline (no attention loss)"
    # a term the schedule never turns on is not trained: attention mining from epoch 7 of 6
    assert method_name(Config(train=TrainConfig(am_start_epoch=6, epochs=6))) == "mask loss alone, L_cl + L_ext (union)"


def test_without_a_terminal_progress_is_plain_lines_with_every_trained_loss(small_shapes_data_dir, tmp_path, capfd):
    from gain_jax.train_loop import train_and_evaluate

    config = tiny_config(small_shapes_data_dir, tmp_path, "plain", log_every=1, num_heatmaps=0)
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, steps_per_epoch=4))
    train_and_evaluate(config)
    out, err = capfd.readouterr()  # neither is a terminal here
    assert "\r" not in out + err and "it/s" not in err
    lines = out.splitlines()
    assert lines[0].startswith("run ") and "GAIN_ext (union), small_cnn on gain_shapes" in lines[0]
    progress = [line for line in lines if " step " in line and line.startswith("epoch ")]
    # a line about every tenth of an epoch (here each step), but neither after the first step (its rate would
    # count the compilation) nor after the last (the epoch line reports it)
    assert [line.split(":")[0] for line in progress] == ["epoch 1/2 step 2/4", "epoch 1/2 step 3/4",
                                                         "epoch 2/2 step 2/4", "epoch 2/2 step 3/4"]
    # the classification-only epoch runs without the attention-mining stream: no L_am to show
    assert all("(cl " in line and ", ex " in line and (", am " in line) == line.startswith("epoch 2/2")
               for line in progress)
    epoch_lines = [line for line in lines if line.startswith("epoch 2/2 (attention mining): train loss")]
    assert len(epoch_lines) == 1 and ", ex " in epoch_lines[0]
    assert "\nGAIN_ext (union) on gain_shapes" in out


def test_the_data_set_facts_agree_with_the_builders():
    import gain_jax.data as gd
    from gain_jax import datasets

    field = next(f for f in dataclasses.fields(DataConfig) if f.name == "dataset")
    assert field.metadata["choices"] == gd.DATASETS == datasets.DATASETS  # --dataset's choices
    for name in gd.DATASETS:
        splits = gd.dataset_info(name).splits  # the builder's own
        assert gd.final_splits(name)[0] == "validation" and set(gd.final_splits(name, test=True)) <= set(splits)


@pytest.mark.slow
def test_dataset_gain_shapes_3_is_opt_in_and_trains(tmp_path, monkeypatch):
    """`--dataset gain_shapes:3.0.0` (the opt-in version) runs and evaluates its own validation splits; the
    default stays 2.0.0. Small splits: the builder reads its sizes at generation time."""
    from gain_jax.data import shapes
    from gain_jax.train_loop import train_and_evaluate

    assert parse([]).data.dataset == "gain_shapes"
    config = parse(["--dataset", "gain_shapes:3.0.0"], tiny_config(str(tmp_path), tmp_path, "v3"))
    assert config.data.dataset == "gain_shapes:3.0.0"
    monkeypatch.setitem(shapes.VERSION_SPLIT_SIZES, "3.0.0", dict(train=32, validation=16, validation_unbiased=16,
                                                                   test_unbiased=16, train_unbiased=16))
    _, history = train_and_evaluate(config)
    assert sorted(os.listdir(tmp_path / "gain_shapes")) == ["3.0.0"]  # 3.0.0 prepared, 2.0.0 not needed
    assert set(history["final"]) == {"validation", "validation_unbiased"}
    assert history["final"]["validation_unbiased"]["num_examples"] == 16
    assert history["final"]["validation"]["num_conflicting"] == 0  # 3.0.0's biased cue is never wrong
