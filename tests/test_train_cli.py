"""train.py end to end on the embedded gain_shapes set with tiny settings: in subprocesses where the process is
what is tested (a whole run with --test, two host devices, SIGINT, --help), in this process through train.py's
main() elsewhere (resumes, config files, error lines), which saves each run a new interpreter's imports.

One tfds data dir and one JAX compilation cache are shared by every run of the session: the data set is
built once, and runs with the same program (same flags up to logging/run names) load it compiled.
"""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train.py")
LOSS_KEYS = ("loss", "cl", "am", "ex")


def environment(compile_cache, devices=1):
    env = dict(os.environ)
    env.update(JAX_COMPILATION_CACHE_DIR=compile_cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
               TF_CPP_MIN_LOG_LEVEL="2")
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}").strip()
    return env


def tiny_flags(data_dir, logdir, run_name):
    return ["--data_dir", data_dir, "--logdir", str(logdir), "--run_name", run_name, "--batch_size", "8",
            "--steps_per_epoch", "2", "--epochs", "2", "--pretrain_epochs", "1", "--image_size", "32",
            "--eval_examples", "16", "--num_heatmaps", "2", "--am_weight", "0.1"]  # GAIN_ext: every stream


def run_train(args, compile_cache, devices=1, timeout=400):
    return subprocess.run([sys.executable, TRAIN, *args], cwd=ROOT, env=environment(compile_cache, devices),
                          capture_output=True, text=True, timeout=timeout)


def load_file(path, name):
    """A fresh module of the script at `path` (scripts are not a package; each test gets its own module state)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_train_py():
    return load_file(TRAIN, "train_cli")


def train_in_process(args, capfd):
    """train.py's main(argv) in this process, its result as run_train gives it: the exit status (argparse's
    SystemExit included) and what it printed."""
    train_py = load_train_py()
    capfd.readouterr()  # only this run's output
    try:
        returncode = train_py.main(list(args))
    except SystemExit as flag_error:
        returncode = flag_error.code
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess([TRAIN, *args], returncode, out, err)


def check_ok(result):
    assert result.returncode == 0, (f"exit {result.returncode}\nstdout:\n{result.stdout[-3000:]}\n"
                                    f"stderr:\n{result.stderr[-3000:]}")


def read_metrics(logdir, run_name):
    with open(os.path.join(logdir, run_name, "metrics.json")) as handle:
        return json.load(handle)


def step_losses(metrics):
    return np.array([[record[key] for key in LOSS_KEYS] for record in metrics["steps"]])


@pytest.fixture(scope="module")
def uninterrupted(shapes_data_dir, compile_cache, tmp_path_factory):
    """The reference tiny run: 2 epochs x 2 steps, attention mining in the 2nd epoch, --test."""
    logdir = tmp_path_factory.mktemp("runs")
    result = run_train(tiny_flags(shapes_data_dir, logdir, "ref") + ["--test"], compile_cache)
    check_ok(result)
    return logdir, result


@pytest.mark.slow
def test_tiny_run_writes_metrics_checkpoints_events_and_heatmaps(uninterrupted):
    logdir, result = uninterrupted
    run_dir = os.path.join(logdir, "ref")
    metrics = read_metrics(logdir, "ref")
    assert metrics["status"] == "finished"
    assert [r["step"] for r in metrics["steps"]] == [1, 2, 3, 4]
    assert [r["attention"] for r in metrics["steps"]] == [False, False, True, True]
    losses = step_losses(metrics)
    # L_am is NaN (not computed) in the classification-only epoch, finite in the one that mines attention
    assert np.all(np.isnan(losses[:2, 2])) and np.all(np.isfinite(np.delete(losses, 2, axis=1)))
    assert np.all(np.isfinite(losses[2:]))
    # before attention mining the optimized total is the classification loss alone; after, it adds the
    # weighted am and ex (--am_weight 0.1 and train.py's default ex_weight 1)
    gain = metrics["config"]["gain"]
    assert (gain["am_weight"], gain["ex_weight"]) == (0.1, 1.0)
    np.testing.assert_allclose(losses[:2, 0], losses[:2, 1], rtol=1e-6)
    np.testing.assert_allclose(losses[2:, 0], losses[2:, 1] + 0.1 * losses[2:, 2] + losses[2:, 3], rtol=1e-5)
    assert np.all(losses[2:, 3] > 0)  # every training image has its mask (--ex_fraction 1)
    assert [r["epoch"] for r in metrics["epochs"]] == [1, 2]
    # the pre-training baseline of the report: the splits beside validation (test_unbiased with --test)
    assert {"validation_unbiased", "test_unbiased"} <= set(metrics["epochs"][0])
    assert "test_unbiased" not in metrics["epochs"][1]
    assert list(metrics["final"]) == ["validation", "validation_unbiased", "test_unbiased"]
    for split in ("validation", "validation_unbiased", "test_unbiased"):
        final = metrics["final"][split]
        assert final["num_examples"] == 16
        for key in ("mAP", "topk_accuracy", "cam_mIoU", "pointing_game"):
            assert 0.0 <= final[key] <= 1.0, (split, key, final[key])
        assert final["pointing_trials"] > 0
    assert metrics["config"]["class_names"] == ["circle", "square", "triangle", "cross", "ring", "diamond"]

    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["2", "4"]
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(run_dir))
    assert sorted(os.listdir(os.path.join(run_dir, "heatmaps"))) == ["step_0000002.png", "step_0000004.png"]
    with open(os.path.join(run_dir, "config.json")) as handle:
        config = json.load(handle)
    assert config["train"]["backbone"] == "small_cnn" and config["data"]["image_size"] == 32
    assert config == metrics["config"]
    # the closing table names the splits and where everything went
    assert "validation_unbiased (pre-trained)" in result.stdout and "test_unbiased (pre-trained)" in result.stdout
    assert "CAM mIoU@0.5" in result.stdout
    assert os.path.join(run_dir, "metrics.json") in result.stdout


@pytest.mark.slow
def test_resume_mid_epoch_gives_the_losses_of_an_uninterrupted_run(uninterrupted, shapes_data_dir, tmp_path, capfd):
    reference = step_losses(read_metrics(uninterrupted[0], "ref"))
    flags = tiny_flags(shapes_data_dir, tmp_path, "resumed")
    stopped = train_in_process(flags + ["--stop_after", "3"], capfd)  # mid-way through epoch 2
    check_ok(stopped)
    assert "continue with --resume" in stopped.stderr
    assert read_metrics(tmp_path, "resumed")["status"] == "stopped after 3 steps"
    resumed = train_in_process(flags + ["--resume"], capfd)
    check_ok(resumed)
    assert "resumed" in resumed.stdout and "at step 3" in resumed.stdout
    metrics = read_metrics(tmp_path, "resumed")
    assert metrics["status"] == "finished"
    assert [r["step"] for r in metrics["steps"]] == [1, 2, 3, 4]
    # same program, same batches, same dropout keys: bit-identical on one CPU, in this process or another
    np.testing.assert_array_equal(step_losses(metrics), reference)


@pytest.mark.slow
def test_two_devices_match_one(uninterrupted, shapes_data_dir, compile_cache, tmp_path):
    reference = step_losses(read_metrics(uninterrupted[0], "ref"))
    result = run_train(tiny_flags(shapes_data_dir, tmp_path, "two"), compile_cache, devices=2)
    check_ok(result)
    assert "on 2 device(s)" in result.stdout
    metrics = read_metrics(tmp_path, "two")
    assert metrics["config"]["device_count"] == 2
    # Same math on a split batch: BatchNorm statistics and means are global under jit; only the order
    # of floating-point reductions differs (measured max |difference| 1e-7 on these losses).
    np.testing.assert_allclose(step_losses(metrics), reference, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_sigint_saves_a_checkpoint_and_exits_130(shapes_data_dir, compile_cache, tmp_path):
    flags = tiny_flags(shapes_data_dir, tmp_path, "sigint")
    flags[flags.index("--steps_per_epoch") + 1] = "100000"
    process = subprocess.Popen([sys.executable, TRAIN, *flags], cwd=ROOT, env=environment(compile_cache),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stderr_lines = []
    reader = threading.Thread(target=lambda: stderr_lines.extend(process.stderr), daemon=True)
    reader.start()
    try:
        for line in process.stdout:
            if line.startswith("first train step"):
                time.sleep(1.0)
                process.send_signal(signal.SIGINT)
                break
        returncode = process.wait(timeout=120)
    finally:
        process.kill()
    reader.join(timeout=10)
    stderr = "".join(stderr_lines)
    assert returncode == 130, stderr[-3000:]
    assert "interrupted by SIGINT" in stderr
    metrics = read_metrics(tmp_path, "sigint")
    assert metrics["status"] == "interrupted by SIGINT"
    done = len(metrics["steps"])
    assert done >= 1
    assert os.listdir(os.path.join(tmp_path, "sigint", "checkpoints")) == [str(done)]


@pytest.mark.slow
def test_non_finite_loss_stops_with_the_step_named(shapes_data_dir, tmp_path, capfd):
    # Adam's first update at lr 1e30 moves every weight by ~1e30: the second forward overflows.
    flags = tiny_flags(shapes_data_dir, tmp_path, "nan") + ["--lr", "1e30", "--steps_per_epoch", "3"]
    result = train_in_process(flags, capfd)
    assert result.returncode == 1
    message = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(message) == 1 and "loss is nan at step 2 (epoch 1)" in message[0], result.stderr[-2000:]
    assert "last good checkpoint: none" in message[0]
    metrics = read_metrics(tmp_path, "nan")
    assert metrics["status"] == "non-finite loss at step 2"
    # metrics read back every --log_every (10) steps: the NaN is still found at its own step, and the
    # steps before it are kept
    assert [r["step"] for r in metrics["steps"]] == [1]


def run_explain(run_dir, classes, out_dir):
    """gain_jax.explain's main() on a random 40x50 photo.png (written beside `out_dir`) for `classes`."""
    from PIL import Image

    from gain_jax import explain

    image_path = out_dir.parent / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(image_path)
    assert explain.main(["--checkpoint", str(run_dir), "--classes", classes, "--out_dir", str(out_dir),
                         str(image_path)]) == 0


@pytest.mark.slow
def test_explain_writes_overlays_from_the_run_checkpoint(uninterrupted, tmp_path):
    from PIL import Image

    out_dir = tmp_path / "cams"
    run_explain(os.path.join(uninterrupted[0], "ref"), "ring,cross", out_dir)
    assert sorted(os.listdir(out_dir)) == ["photo_cross.png", "photo_ring.png"]
    assert Image.open(out_dir / "photo_ring.png").size == (50, 40)  # the picture's own resolution


@pytest.mark.slow
def test_config_file_with_overrides_reruns_a_saved_run(uninterrupted, tmp_path, capfd):
    ref_dir = os.path.join(uninterrupted[0], "ref")
    result = train_in_process(["--config", os.path.join(ref_dir, "config.json"), "--logdir", str(tmp_path),
                               "--run_name", "again", "--epochs", "1", "--stop_after", "1"], capfd)
    check_ok(result)
    with open(os.path.join(tmp_path, "again", "config.json")) as handle:
        config = json.load(handle)
    # the flags given override the file, the rest comes from it
    assert config["train"]["epochs"] == 1 and config["log"]["run_name"] == "again"
    assert config["train"]["batch_size"] == 8 and config["eval"]["eval_examples"] == 16
    metrics = read_metrics(tmp_path, "again")
    assert metrics["status"] == "stopped after 1 steps"
    reference = step_losses(read_metrics(uninterrupted[0], "ref"))
    np.testing.assert_array_equal(step_losses(metrics), reference[:1])


def test_help_lists_every_flag_with_its_help_and_default():
    from gain_jax.config import Config, sections

    result = subprocess.run([sys.executable, TRAIN, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    text = " ".join(result.stdout.split())
    for section in sections(Config()).values():
        for field in section.__dataclass_fields__.values():
            assert f"--{field.name}" in text and " ".join(field.metadata["help"].split()) in text, field.name
    for flag in ("--config JSON", "--resume", "--stop_after", "--coordinator_address"):
        assert flag in text
    assert "(default: 0.001)" in text and "(default: small_cnn)" in text


# ---------------------------------------------------------------------------------------------- errors

def assert_clean_error(result, logdir, *fragments):
    """Non-zero exit, one line naming the problem, and no run folder written."""
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert not os.path.exists(os.path.join(logdir, "bad")), os.listdir(os.path.join(logdir, "bad"))


def test_error_missing_data_dir(tmp_path, capfd):
    missing = str(tmp_path / "no_such_dir")
    result = train_in_process(tiny_flags(missing, tmp_path, "bad"), capfd)
    assert_clean_error(result, tmp_path, "data dir", missing, "does not exist")


@pytest.mark.slow
def test_error_invalid_value_names_the_flag(shapes_data_dir, tmp_path, capfd):
    result = train_in_process(tiny_flags(shapes_data_dir, tmp_path, "bad") + ["--sigma", "-1"], capfd)
    assert_clean_error(result, tmp_path, "train.py: error: --sigma must be in [0, 1], got -1.0")
    assert result.returncode == 1
    missing = str(tmp_path / "none.json")
    result = train_in_process(tiny_flags(shapes_data_dir, tmp_path, "bad") + ["--config", missing], capfd)
    assert_clean_error(result, tmp_path, f"--config {missing}")


@pytest.mark.slow
def test_error_unknown_backbone(shapes_data_dir, tmp_path, capfd):
    result = train_in_process(tiny_flags(shapes_data_dir, tmp_path, "bad") + ["--backbone", "vgg99"], capfd)
    assert_clean_error(result, tmp_path, "--backbone", "invalid choice: 'vgg99'", "small_cnn")
    assert result.returncode == 2  # argparse's status for a bad flag, as before


@pytest.mark.slow
def test_error_batch_size_not_divisible_by_devices(shapes_data_dir, compile_cache, tmp_path):
    flags = tiny_flags(shapes_data_dir, tmp_path, "bad")
    flags[flags.index("--batch_size") + 1] = "3"
    result = run_train(flags, compile_cache, devices=2)
    assert_clean_error(result, tmp_path, "--batch_size 3", "2 devices")


@pytest.mark.slow
def test_error_init_file_that_does_not_fit(shapes_data_dir, tmp_path, capfd):
    import torch

    from gain_torch_ref.small_cnn import small_cnn

    state_dict = small_cnn(num_classes=6).state_dict()
    state_dict["features.4.weight"] = torch.zeros(32, 8, 3, 3)  # conv 2 expects 16 input channels
    path = tmp_path / "wrong.pth"
    torch.save(state_dict, path)
    result = train_in_process(tiny_flags(shapes_data_dir, tmp_path, "bad") + ["--init", str(path)], capfd)
    assert_clean_error(result, tmp_path, str(path), "does not fit backbone small_cnn", "features.4.weight",
                       "(32, 16, 3, 3)", "(32, 8, 3, 3)")


@pytest.mark.slow
def test_backbone_small_cnn_nobn_imports_trains_resumes_and_explains(shapes_data_dir, tmp_path, capfd):
    """--backbone small_cnn_nobn end to end: the torch twin's weights (--init), attention-mining steps, a
    checkpoint without BatchNorm statistics that --resume and gain_jax.explain read back."""
    import torch

    from gain_torch_ref.small_cnn import small_cnn

    init_path = tmp_path / "nobn.pth"
    torch.save(small_cnn(num_classes=6, batchnorm=False).state_dict(), init_path)
    flags = tiny_flags(shapes_data_dir, tmp_path, "nobn") + ["--backbone", "small_cnn_nobn", "--init", str(init_path)]
    check_ok(train_in_process(flags + ["--stop_after", "3"], capfd))  # step 3 mines attention
    resumed = train_in_process(flags + ["--resume"], capfd)
    check_ok(resumed)
    assert "at step 3" in resumed.stdout
    metrics = read_metrics(tmp_path, "nobn")
    assert metrics["status"] == "finished" and metrics["config"]["train"]["backbone"] == "small_cnn_nobn"
    assert [r["attention"] for r in metrics["steps"]] == [False, False, True, True]
    losses = step_losses(metrics)
    assert np.all(np.isnan(losses[:2, 2])) and np.all(np.isfinite(np.delete(losses, 2, axis=1)))
    assert np.all(np.isfinite(losses[2:])) and np.all(losses[2:, 2] > 0)
    run_explain(tmp_path / "nobn", "ring", tmp_path / "cams")
    assert os.listdir(tmp_path / "cams") == ["photo_ring.png"]
