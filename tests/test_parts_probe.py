"""experiments/parts_probe.py end to end on tiny settings: gain_parts built with small splits, two arms, two
steps each, 8 evaluation images; the part/body figures land in the JSON and the reference maps score what
they must (the whole-object map: PxAP 1, full recall; the pixel part-only map: part share 1)."""
import json
import os
import sys

import pytest
import tensorflow_datasets as tfds

from gain_jax.data import parts

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
import parts_probe as script


@pytest.fixture
def small_parts(tmp_path, monkeypatch):
    monkeypatch.setattr(parts, "SPLIT_SIZES", {"train": 16, "validation": 8, "test": 4})
    data_dir = str(tmp_path / "tfds")
    os.makedirs(data_dir)
    tfds.builder("gain_parts", data_dir=data_dir).download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return data_dir


def test_flags_of_the_arms():
    args = script.build_parser().parse_args(["--epochs", "3"])
    baseline, gain_ext = script.config_of("baseline", args), script.config_of("GAIN_ext", args)
    assert baseline.gain.am_weight == 0 and baseline.gain.ex_weight == 0
    assert baseline.train.pretrain_epochs == baseline.train.epochs == 3
    assert gain_ext.gain.ex_weight == 1 and gain_ext.data.ex_fraction == 1 and gain_ext.gain.erase == "shift"
    assert gain_ext.data.dataset == "gain_parts" and gain_ext.train.backbone == "small_cnn"
    fine = script.config_of("baseline", script.build_parser().parse_args(["--backbone", "small_cnn_fine"]))
    assert fine.train.backbone == "small_cnn_fine"
    assert script.run_name("baseline", script.build_parser().parse_args([])) == "gain_parts_baseline_seed0"


@pytest.mark.slow
def test_tiny_probe_end_to_end(small_parts, tmp_path, capsys):
    out = tmp_path / "out"
    # one arm (every arm takes the same path through the probe; a second, the baseline, cost a train step's compile
    # and its training for the same checks), one epoch with GAIN_ext's attention from its start (a
    # classification-only epoch would compile a second train step), validation evaluated once: what is checked (the
    # probe's evaluation of a finished run, the references, --reuse) does not depend on the arms, epochs or schedule
    argv = ["--arms", "GAIN_ext", "--epochs", "1", "--pretrain_epochs", "0", "--steps_per_epoch", "2",
            "--batch_size", "8", "--eval_examples", "8", "--data_dir", small_parts,
            "--logdir", str(tmp_path / "runs"), "--out", str(out), "--name", "tiny"]
    assert script.main(argv) == 0
    with open(out / "tiny.json") as handle:
        results = json.load(handle)["results"]
    assert set(results) == {"GAIN_ext", "part_only_pixels", "part_only_grid8", "part_only_grid4", "whole_object"}
    row = results["GAIN_ext"]
    assert row["num_images"] == 8 and 0 <= row["body_share"] <= 1 and 0 <= row["part_share"] <= 1
    assert 0 < row["p_image"] < 1 and 0 < row["p_part_erased"] < 1 and row["minutes"] > 0
    assert row["mAP"] is not None
    whole, part_only = results["whole_object"], results["part_only_pixels"]
    assert whole["pxap"] == pytest.approx(1.0) and whole["body_recall_mean"] == 1.0
    assert part_only["part_share"] == 1.0 and part_only["body_recall_mean"] == 0.0
    # the grid floors spread over the part's cells, part of which is body: less of it at the finer grid
    assert 0 < results["part_only_grid4"]["body_share"] < results["part_only_grid8"]["body_share"] < 1
    assert "| GAIN_ext |" in (out / "tiny.md").read_text() and "whole_object" in capsys.readouterr().out
    assert (out / "tiny.png").stat().st_size > 0
    # --reuse evaluates the finished runs without training them again
    assert script.main(argv + ["--reuse"]) == 0
    assert "reusing" in capsys.readouterr().out
