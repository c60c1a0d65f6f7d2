"""The benchmark scripts' own paths, at the smallest sizes (no time is checked, only that they run and
report what bench/README.md says): step_time.py --gpu (issue 12 item 5) and seed_sweep.py on the CPU, without
TensorFlow, gain_overhead.py's per-program host-memory child (item 6) and its flops column (XLA's cost analysis, which
does not depend on the machine's speed).

The JAX tests use one configuration, small_cnn 32x32 batch 2 with 20 classes (step_time.py's and xla_flags.py's
smoke sizes), so that a program one of them compiles (the union and per-label GAIN steps, the classification
step) loads from the session's compilation cache in the next (subprocesses included), and gain_overhead.py's
eager model set-up is cached once for its memory children and the flops test.

Every program here, in the subprocesses and in this process, compiles with JAX's `jax_disable_most_optimizations`
(XLA's backend optimization level 0, as all of tests/: tests/conftest.py's compile_at_level_0): what the tests
check does not depend on the machine code's speed, and XLA's HLO passes still run, so XLA's cost analysis and
memory analysis are the default level's (the same flops, temp and program bytes for the classification, union
and packed steps at these sizes). ENV below sets it too, for the subprocesses, since ENV is a copy of the
environment taken when this module is imported, before that fixture sets it."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1",
           JAX_DISABLE_MOST_OPTIMIZATIONS="1")  # see the module docstring; xla_flags.py's children inherit it


def run(*args):
    result = subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout[-3000:]}\n" \
                                   f"stderr:\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.mark.slow
def test_step_time_gpu_path_runs_on_cpu_without_tensorflow():
    out = run("bench/step_time.py", "--gpu", "--backbone", "small_cnn", "--image-size", "32", "--batch-size", "2",
              "--steps", "1", "--warmup", "1", "--torch-threads", "1")
    assert "not GPU figures" in out
    header = next(line for line in out.splitlines() if line.startswith("backbone") and "JAX img/s" in line)
    for column in ("torch img/s", "ratio", ">=3x", "JAX XLA", "JAX peak", "torch peak"):
        assert column in header, column
    rows = [line for line in out.splitlines() if line.startswith("small_cnn") and not line.endswith(":")]
    cases = ["union (2 labels)", "per-label, 1 label", "per-label, 2 labels", "per-label, 3 labels"]
    assert [next((case for case in cases if f"  {case}  " in row), None) for row in rows] == cases
    assert all(row.split()[-2:] == ["n/a", "n/a"] for row in rows)  # no device peaks on the CPU
    assert "one image at a time" not in out  # --gpu skips the batch-1 loop
    assert out.rstrip().endswith("TensorFlow imported: no")


@pytest.mark.slow
def test_gain_overhead_memory_child_reports_host_peak():
    # the sizes of test_gain_step_work_grows_with_the_rows_present and of step_time.py's smoke run above (batch 2:
    # a positive peak does not depend on the batch), so that the per-label K=2 padded step (step_time.py's
    # "per-label, 2 labels") loads from the session's compilation cache, and the classification step compiled
    # here serves xla_flags.py's default child and the flops test
    spec = dict(backbone="small_cnn", image_size=32, batch_size=2, num_classes=20, voc_batches=1, steps=1)
    peaks = {}
    for case in (-1, 1):  # the classification step, per-label K=2 padded
        last = run("bench/gain_overhead.py", "--memory-child", json.dumps(dict(spec, case=case))).splitlines()[-1]
        peaks[case] = json.loads(last)["peak_bytes"]
    assert all(isinstance(peak, int) and peak > 0 for peak in peaks.values()), peaks


@pytest.mark.slow
def test_xla_flags_reports_each_set_and_a_rejected_flag():
    out = run("bench/xla_flags.py", "--configs", "small_cnn:32:2", "--sets", "default",
              "--flags", "fast_min_max=--xla_cpu_enable_fast_min_max=true", "bogus=--xla_cpu_no_such_flag=true",
              "--steps", "1", "--warmup", "1", "--torch-threads", "1")
    header = next(line for line in out.splitlines() if line.startswith("config"))
    for column in ("GAIN ms", "cls ms", "torch ms", "torch/JAX", "vs default", "loss rel diff", "library calls"):
        assert column in header, column
    rows = {line.split()[3]: line for line in out.splitlines() if line.startswith("small_cnn 32x32 b2")}
    assert list(rows) == ["default", "fast_min_max", "bogus"]
    for name in ("default", "fast_min_max"):  # fast min/max is already XLA:CPU's default: the same numerics
        fields = rows[name].split()
        gain_ms, cls_ms, torch_ms = float(fields[4]), float(fields[5]), float(fields[7])
        assert gain_ms > 0 and cls_ms > 0 and torch_ms > 0, rows[name]
        assert "DIFFERS" not in rows[name] and "FAILED" not in rows[name], rows[name]
    assert "FAILED" in rows["bogus"] and "Unknown flag" in rows["bogus"], rows["bogus"]
    assert "XLA_FLAGS=--xla_cpu_no_such_flag=true" in out
    assert "TensorFlow was imported" not in out


def test_voc_label_counts_follow_the_voc_histogram():
    """gain_overhead.py's VOC rows: a systematic sample of the VOC 2012 train counts, so that even 16 images
    have about the population's labels per image (16 drawn at random had 1.12 against 1.55)."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import gain_overhead as go
    import numpy as np
    population = go.voc_mean_labels()
    for num_images in (16, 128, 512):
        counts = go.voc_label_counts(num_images, np.random.default_rng(go.VOC_SEED))
        assert len(counts) == num_images and set(counts) <= set(go.VOC2012_TRAIN_LABEL_HISTOGRAM)
        assert abs(counts.mean() - population) < 0.06, (num_images, counts.mean())
        share_single = (counts == 1).mean()  # 3437 / 5717 = 0.601 in the population
        assert abs(share_single - 3437 / 5717) < 1 / num_images + 1e-9, (num_images, share_single)
    large = go.voc_label_counts(512, np.random.default_rng(0))
    assert large.max() >= 5  # the tail of 5- and 6-label images is represented
    assert not np.array_equal(large, np.sort(large))  # shuffled, not in quantile order


@pytest.mark.slow
def test_gain_step_work_grows_with_the_rows_present():
    """gain_overhead.py's "flops" column (XLA's cost analysis): a GAIN step does one classification
    forward+backward plus an attention-mining forward+backward over R rows, so its flops are about 1 + R/B plain
    steps; packed per-label pays for the (image, label) pairs present, padded for every slot."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import gain_overhead as go
    # batch 2 (step_time.py's and xla_flags.py's smoke size): the union, K=2 / VOC padded and classification
    # steps then load from the session's compilation cache; the flops are 1 + R/B within 0.5% at B=2 as at B=4,
    # and the VOC packed row then rounds 3 pairs up to row_count(3, 2) = 3 rows
    batch_size = 2
    bench_setup = go.setup("small_cnn", 32, batch_size, voc_batches=1)
    names = [case.name for case in bench_setup.cases]

    def flops_and_rows(name):
        index = go.CLS_CASE if name == "cls" else names.index(name)
        ((*_, shape, _temp, _bytes, flops),) = list(go.programs(bench_setup, index))
        rows = int(shape.split("R=")[1]) if "R=" in shape else batch_size
        return flops, rows

    cls_flops, _ = flops_and_rows("cls")
    assert cls_flops and cls_flops > 0
    voc_labels = bench_setup.cases[names.index("per-label VOC packed")].label_batches[0]
    present = int((voc_labels > 0).sum())
    for name in ("union (2 labels)", "per-label K=2 padded", "per-label K=2 packed", "per-label VOC padded",
                 "per-label VOC packed", "per-label K=3 sampled"):
        flops, rows = flops_and_rows(name)
        expected = 1 + rows / batch_size
        assert abs(flops / cls_flops - expected) < 0.1 * expected, (name, flops / cls_flops, rows)
        if name == "per-label VOC packed":
            assert rows == go.gj.gain.row_count(present, batch_size), (rows, present)  # the pairs present
        if name == "per-label VOC padded":
            assert rows == batch_size * int((voc_labels > 0).sum(-1).max())


@pytest.mark.slow
def test_seed_sweep_reports_every_way_for_each_run_count():
    # every way up to --max-unrolled runs, vmap alone above it (each row compiles a GAIN step: as few as show it)
    out = run("bench/seed_sweep.py", "--seeds", "1,2", "--max-unrolled", "1", "--image-size", "16",
              "--batch-size", "2", "--steps", "1", "--warmup", "1", "--repeats", "1")
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [(row[0], row[1]) for row in rows] == [("1", "sequential"), ("1", "unrolled"), ("1", "vmap"), ("2", "vmap")]
    assert all(float(row[2]) > 0 for row in rows)
    assert rows[0][4] == "1.00x" and rows[-1][4] == "n/a"
