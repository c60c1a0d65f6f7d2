"""Failure paths: corrupt checkpoints and metrics, signals at awkward moments, unwritable folders, resuming a
run that does not exist. Each ends with one line and a non-zero status (or the interrupt line and 130), no
traceback, and no earlier checkpoint or metrics lost.

Library behaviour runs in-process on tiny runs (batch 8, 2 steps per epoch, 32x32 images, 16 evaluation
examples); signals and exit statuses run train.py in subprocesses sharing one data dir and compile cache (a
resume after them, in this process, through train.py's main()).
"""
import dataclasses
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
from test_train_cli import ROOT, TRAIN, environment, read_metrics, tiny_flags, train_in_process
from test_train_loop import tiny_config as train_loop_tiny_config

from gain_jax import checkpoint, explain
from gain_jax.config import RunError, RunInterrupted


def tiny_config(data_dir, logdir, run_name, **log_changes):
    return train_loop_tiny_config(data_dir, logdir, run_name, **{"num_heatmaps": 0, **log_changes})


@pytest.fixture(scope="module")
def finished_run(shapes_data_dir, tmp_path_factory):
    """A finished tiny run (checkpoints 2 and 4); tests corrupt copies of it."""
    from gain_jax.train_loop import train_and_evaluate

    logdir = tmp_path_factory.mktemp("runs")
    train_and_evaluate(tiny_config(shapes_data_dir, logdir, "base"))
    return logdir


def copy_run(finished_run, logdir, name="run"):
    shutil.copytree(os.path.join(finished_run, "base"), os.path.join(logdir, name))
    return os.path.join(logdir, name)


def listing(run_dir):
    return sorted(os.listdir(os.path.join(run_dir, "checkpoints")))


def error_lines(text):
    return [line for line in text.splitlines() if "error:" in line or line.startswith("WARNING")]


def no_noise(text):
    assert "Traceback" not in text and "Exception ignored" not in text and "Fatal Python" not in text, text[-3000:]


CORRUPTIONS = {
    "data file truncated": lambda step: [os.truncate(path, 10) for path in
                                         glob.glob(os.path.join(step, "state", "ocdbt.process_0", "d", "*"))],
    "manifest.ocdbt removed": lambda step: [os.remove(path) for path in
                                            glob.glob(os.path.join(step, "state", "**", "manifest.ocdbt"),
                                                      recursive=True)],
    "_METADATA removed": lambda step: os.remove(os.path.join(step, "state", "_METADATA")),
    "state/ removed": lambda step: shutil.rmtree(os.path.join(step, "state")),
    "meta/ removed": lambda step: shutil.rmtree(os.path.join(step, "meta")),
}


# ---------------------------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
@pytest.mark.slow
def test_resume_from_a_corrupt_newest_checkpoint_falls_back_to_the_newest_intact_one(
        corruption, finished_run, shapes_data_dir, tmp_path, capfd):
    from gain_jax.train_loop import train_and_evaluate

    run_dir = copy_run(finished_run, tmp_path)
    CORRUPTIONS[corruption](os.path.join(run_dir, "checkpoints", "4"))
    config = tiny_config(shapes_data_dir, tmp_path, "run")
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, epochs=3))
    capfd.readouterr()
    _, history = train_and_evaluate(config, resume=True, stop_after=1)
    out, err = capfd.readouterr()
    no_noise(err)
    warnings = error_lines(err)
    assert len(warnings) == 1, err[-3000:]
    assert "checkpoint step 4" in warnings[0] and "unreadable" in warnings[0]
    assert "resuming from step 2, the newest intact one" in warnings[0] and "4.corrupt" in warnings[0]
    assert "resumed" in out and "at step 2" in out
    assert history["status"] == "stopped after 1 steps"
    assert [r["step"] for r in history["steps"]] == [1, 2, 3]
    assert listing(run_dir) == ["2", "3", "4.corrupt"]  # the unreadable one is kept, aside


@pytest.mark.slow
def test_resume_when_no_checkpoint_restores_is_an_error_that_changes_nothing(finished_run, shapes_data_dir,
                                                                              tmp_path, capfd):
    from gain_jax.train_loop import train_and_evaluate

    run_dir = copy_run(finished_run, tmp_path)
    for step in ("2", "4"):
        CORRUPTIONS["data file truncated"](os.path.join(run_dir, "checkpoints", step))
    with open(os.path.join(run_dir, "metrics.json")) as handle:
        metrics_before = handle.read()
    with pytest.raises(RunError, match=r"no checkpoint in .* can be restored: step 4 \(OUT_OF_RANGE.*older ones"):
        train_and_evaluate(tiny_config(shapes_data_dir, tmp_path, "run"), resume=True)
    no_noise(capfd.readouterr().err)
    assert listing(run_dir) == ["2", "4"]
    with open(os.path.join(run_dir, "metrics.json")) as handle:
        assert handle.read() == metrics_before


@pytest.mark.slow
def test_resume_with_a_truncated_metrics_json_is_an_error_that_changes_nothing(finished_run, shapes_data_dir,
                                                                               tmp_path):
    from gain_jax.train_loop import train_and_evaluate

    run_dir = copy_run(finished_run, tmp_path)
    path = os.path.join(run_dir, "metrics.json")
    with open(path, "r+") as handle:
        handle.truncate(100)
    with open(path) as handle:
        truncated = handle.read()
    with pytest.raises(RunError, match=r"metrics.json is not valid JSON .*move it away to resume without them"):
        train_and_evaluate(tiny_config(shapes_data_dir, tmp_path, "run"), resume=True)
    assert listing(run_dir) == ["2", "4"]
    with open(path) as handle:
        assert handle.read() == truncated


@pytest.mark.slow
def test_explain_names_the_corrupt_checkpoint_and_the_intact_step(finished_run, tmp_path, capsys):
    from PIL import Image

    run_dir = copy_run(finished_run, tmp_path)
    CORRUPTIONS["data file truncated"](os.path.join(run_dir, "checkpoints", "4"))
    photo = tmp_path / "photo.png"
    Image.new("RGB", (20, 20)).save(photo)
    out_dir = tmp_path / "cams"
    assert explain.main(["--checkpoint", run_dir, "--out_dir", str(out_dir), str(photo)]) == 1
    err = capsys.readouterr().err
    no_noise(err)
    assert len(err.splitlines()) == 1 and err.startswith("explain: error: checkpoint step 4"), err
    assert "unreadable" in err and "use --step 2" in err
    assert not out_dir.exists()
    assert explain.main(["--checkpoint", run_dir, "--step", "2", "--out_dir", str(out_dir), str(photo)]) == 0
    assert explain.main(["--checkpoint", run_dir, "--step", "2", "--out_dir", "/proc/x", str(photo)]) == 1
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("explain: error: --out_dir /proc/x: cannot create folders in /proc"), err


@pytest.mark.slow
def test_checkpoint_errors_are_one_line_for_every_reader(finished_run, tmp_path):
    run_dir = copy_run(finished_run, tmp_path)
    shutil.rmtree(os.path.join(run_dir, "checkpoints", "4", "state"))
    manager = checkpoint.open_manager(os.path.join(run_dir, "checkpoints"), create=False)
    with pytest.raises(checkpoint.CheckpointError, match=r"checkpoint step 4 in .* is unreadable \(.*state") as raised:
        checkpoint.restore_variables(manager, 4)
    assert "\n" not in str(raised.value)
    assert "params" in checkpoint.restore_variables(manager, 2)


# ---------------------------------------------------------------------------------------------- folders

@pytest.mark.slow
def test_unwritable_or_file_folders_are_refused_before_anything_is_written(shapes_data_dir, tmp_path):
    from gain_jax.train_loop import train_and_evaluate

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    elsewhere = tmp_path / "elsewhere"
    config = tiny_config(shapes_data_dir, tmp_path, "bad")
    cases = [
        (dict(log=dict(logdir="/proc/x")), r"--logdir /proc/x: cannot create folders in /proc"),
        (dict(log=dict(logdir=str(a_file))), r"--logdir .*a_file is not a directory"),
        (dict(log=dict(logdir="/proc/x", checkpoint_dir=str(elsewhere))), r"--logdir /proc/x"),
        (dict(log=dict(checkpoint_dir=str(a_file / "sub"))), r"--checkpoint_dir .*a_file is not a directory"),
        (dict(data=dict(data_dir=str(a_file))), r"data dir .*a_file is not a directory \(--data_dir\)"),
    ]
    for changes, message in cases:
        changed = config
        for section, values in changes.items():
            changed = dataclasses.replace(changed, **{section: dataclasses.replace(getattr(changed, section),
                                                                                   **values)})
        with pytest.raises(RunError, match=message) as raised:
            train_and_evaluate(changed)
        assert "\n" not in str(raised.value)
    assert sorted(os.listdir(tmp_path)) == ["a_file"]  # no run folder, no checkpoint folder elsewhere


@pytest.mark.slow
def test_resume_of_a_run_that_does_not_exist_names_it_and_the_existing_runs(finished_run, shapes_data_dir,
                                                                            tmp_path):
    from gain_jax.train_loop import train_and_evaluate

    copy_run(finished_run, tmp_path, "real_run")
    with pytest.raises(RunError, match=r"--resume: there is no run .*typo; runs under .*: real_run$"):
        train_and_evaluate(tiny_config(shapes_data_dir, tmp_path, "typo"), resume=True)
    os.makedirs(tmp_path / "empty")
    with pytest.raises(RunError, match=r"--resume: no checkpoint in .*empty.checkpoints, nothing to resume"):
        train_and_evaluate(tiny_config(shapes_data_dir, tmp_path, "empty"), resume=True)
    assert sorted(os.listdir(tmp_path)) == ["empty", "real_run"]


# ---------------------------------------------------------------------------------------------- stopping

@pytest.mark.slow
def test_a_stop_requested_during_start_up_writes_nothing(shapes_data_dir, tmp_path):
    from gain_jax.train_loop import StopRequest, train_and_evaluate

    stop = StopRequest()
    stop.request("a test")
    with pytest.raises(RunInterrupted, match="interrupted by a test while starting, before training: nothing"):
        train_and_evaluate(tiny_config(shapes_data_dir, tmp_path, "early"), stop_request=stop)
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_signals_during_evaluation_and_the_save_never_lose_the_checkpoint(shapes_data_dir, tmp_path, monkeypatch,
                                                                         capfd):
    """SIGINT during the epoch's evaluation, then two more while the checkpoint is written: the save
    completes, the third signal does not end the process, and the status and metrics say step 2."""
    from gain_jax import train_loop
    from gain_jax.train_loop import loop, stopping

    stop = train_loop.StopRequest()
    evaluate, save = train_loop.evaluate_split, checkpoint.save
    saves = []

    def evaluate_then_signal(run, state, split, stop_request=None):
        stop(signal.SIGINT, None)  # the evaluation notices it and stops
        return evaluate(run, state, split, stop_request)

    def save_with_signals(*args, **kwargs):
        stop(signal.SIGINT, None)
        stop(signal.SIGINT, None)  # a third signal: deferred inside the save
        saves.append(args[1])
        return save(*args, **kwargs)

    def no_exit(status):
        raise AssertionError(f"os._exit({status}) during a save")

    monkeypatch.setattr(loop, "evaluate_split", evaluate_then_signal)
    monkeypatch.setattr(checkpoint, "save", save_with_signals)
    monkeypatch.setattr(stopping.os, "_exit", no_exit)
    stop.training = True
    config = tiny_config(shapes_data_dir, tmp_path, "stopped", checkpoint_every=2)
    _, history = train_loop.train_and_evaluate(config, stop_request=stop)
    err = capfd.readouterr().err
    assert "writing a checkpoint; stopping once it is complete" in err
    assert saves == [2] and history["status"] == "interrupted by SIGINT" and history["global_step"] == 2
    assert listing(os.path.join(tmp_path, "stopped")) == ["2"]
    assert [r["step"] for r in read_metrics(tmp_path, "stopped")["steps"]] == [1, 2]


# ---------------------------------------------------------------------------------------------- train.py

def start_train(flags, compile_cache):
    process = subprocess.Popen([sys.executable, TRAIN, *flags], cwd=ROOT, env=environment(compile_cache),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stderr_lines = []
    reader = threading.Thread(target=lambda: stderr_lines.extend(process.stderr), daemon=True)
    reader.start()
    return process, stderr_lines, reader


def finish(process, reader, stderr_lines, timeout=120):
    try:
        returncode = process.wait(timeout=timeout)
    finally:
        process.kill()
    reader.join(timeout=10)
    return returncode, "".join(stderr_lines)


@pytest.mark.slow
def test_a_second_sigint_right_after_the_first_keeps_the_checkpoint_and_says_what_is_saved(
        shapes_data_dir, compile_cache, tmp_path, capfd):
    flags = tiny_flags(shapes_data_dir, tmp_path, "double")
    flags[flags.index("--steps_per_epoch") + 1] = "100000"
    process, stderr_lines, reader = start_train(flags, compile_cache)
    for line in process.stdout:
        if line.startswith("first train step"):
            time.sleep(0.5)
            process.send_signal(signal.SIGINT)
            time.sleep(0.2)  # while the checkpoint is being written
            process.send_signal(signal.SIGINT)
            break
    returncode, stderr = finish(process, reader, stderr_lines)
    assert returncode == 130, stderr[-3000:]
    no_noise(stderr)
    metrics = read_metrics(tmp_path, "double")
    done = metrics["global_step"]
    assert done >= 1 and metrics["status"] == "interrupted by SIGINT"
    assert [r["step"] for r in metrics["steps"]] == list(range(1, done + 1))
    assert f"interrupted by SIGINT at step {done}: checkpoint saved" in stderr
    assert listing(os.path.join(tmp_path, "double")) == [str(done)]  # complete: no *.orbax-checkpoint-tmp
    # the checkpoint resumes (in this process: what is tested here is the interrupted process's)
    resumed = train_in_process([*flags, "--resume", "--stop_after", "1"], capfd)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {done} " in resumed.stdout


@pytest.mark.parametrize("delay", [0.3, 2.0, 4.0])
@pytest.mark.slow
def test_sigint_at_any_moment_of_the_start_up_exits_130_cleanly(delay, shapes_data_dir, compile_cache, tmp_path):
    process, stderr_lines, reader = start_train(tiny_flags(shapes_data_dir, tmp_path, "early"), compile_cache)
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    returncode, stderr = finish(process, reader, stderr_lines)
    assert returncode == 130, stderr[-3000:]
    no_noise(stderr)
    run_dir = os.path.join(tmp_path, "early")
    if "before training: nothing written" in stderr:
        assert not os.path.exists(run_dir)
    else:  # training had started: a checkpoint of the steps done
        done = read_metrics(tmp_path, "early")["global_step"]
        assert listing(run_dir) == [str(done)] and f"at step {done}: checkpoint saved" in stderr


@pytest.mark.parametrize("case", ["logdir in /proc", "resume a typo"])
@pytest.mark.slow
def test_train_py_errors_are_one_line(case, finished_run, shapes_data_dir, compile_cache, tmp_path):
    if case == "logdir in /proc":
        flags, message = tiny_flags(shapes_data_dir, "/proc/x", "run"), "--logdir /proc/x: cannot create folders"
    else:
        flags = tiny_flags(shapes_data_dir, finished_run, "typo") + ["--resume"]
        message = "there is no run"
    result = subprocess.run([sys.executable, TRAIN, *flags], cwd=ROOT, env=environment(compile_cache),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    no_noise(result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("train.py: error:") and message in lines[0], result.stderr


@pytest.mark.slow
def test_metrics_json_is_written_atomically(finished_run):
    with open(os.path.join(finished_run, "base", "metrics.json")) as handle:
        assert json.load(handle)["status"] == "finished"
    assert not glob.glob(os.path.join(finished_run, "base", "*.tmp"))


@pytest.mark.slow
def test_a_signal_during_the_shutdown_changes_nothing(shapes_data_dir, compile_cache, tmp_path):
    """Once the run's last line is printed its files are complete; a Ctrl-C while the interpreter shuts down
    (JAX, TensorFlow and orbax tear down for a while) must not turn the exit status into a kill (-2)."""
    process, stderr_lines, reader = start_train(
        tiny_flags(shapes_data_dir, tmp_path, "late") + ["--stop_after", "1"], compile_cache)
    deadline = time.time() + 200
    while time.time() < deadline and not any("stopped after 1 steps" in line for line in stderr_lines):
        if process.poll() is not None:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    returncode, stderr = finish(process, reader, stderr_lines)
    assert returncode == 0, (returncode, stderr[-3000:])
    assert "stopped after 1 steps at step 1" in stderr
    no_noise(stderr)


@pytest.mark.slow
def test_a_signal_to_one_process_of_two_stops_both_at_the_same_step_with_one_checkpoint(
        shapes_data_dir, compile_cache, tmp_path):
    """Two train.py processes (one CPU device each) on loopback: SIGTERM to process 1 alone; the processes
    agree on the stop (every --log_every steps), save one checkpoint together and both exit 130."""
    import socket

    with socket.socket() as probe:  # a free port for the coordinator
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    flags = tiny_flags(shapes_data_dir, tmp_path, "two_hosts") + ["--log_every", "2"]
    flags[flags.index("--steps_per_epoch") + 1] = "100000"
    started = [start_train(flags + ["--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2",
                                    "--process_id", str(index)], compile_cache) for index in (0, 1)]
    for line in started[0][0].stdout:  # process 0 prints the run's lines
        if line.startswith("first train step"):
            time.sleep(0.5)
            started[1][0].send_signal(signal.SIGTERM)
            break
    results = [finish(process, reader, lines, timeout=240) for process, lines, reader in started]
    for returncode, stderr in results:
        assert returncode == 130, stderr[-3000:]
        no_noise(stderr)
    assert "SIGTERM: stopping at the next step boundary" in results[1][1]
    metrics = read_metrics(tmp_path, "two_hosts")
    done = metrics["global_step"]
    assert done >= 2 and done % 2 == 0 and metrics["status"] == "interrupted by a stop on process 1"
    assert [r["step"] for r in metrics["steps"]] == list(range(1, done + 1))
    assert listing(os.path.join(tmp_path, "two_hosts")) == [str(done)]
    assert f"at step {done}: checkpoint saved" in results[0][1]
