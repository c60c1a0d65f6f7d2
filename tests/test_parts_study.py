"""experiments/parts_study.py: each arm's train.py settings (fast, no training), the flags' refusals, and the
commands end to end on a tiny gain_parts (slow: train two seeds of two arms, each arm's seeds together as one
seed sweep, select, test, heldout, figure, dose on two configs, one run at a time)."""
import json
import os
import sys

import pytest

from gain_jax import config as run_config

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
import parts_study as study


def settings(arm, argv=()):
    args = study.parse_args(["--budget", "tiny", *argv])
    return study.run_config_of(arm, 0, args)


def differences(arm, reference="GAIN"):
    """{setting: (reference's, arm's)} of two arms' configs."""
    return {name: (a, b) for name, a, b in run_config.setting_differences(settings(reference), settings(arm))}


def test_every_arm_parses_and_the_study_lists_them_all():
    args = study.parse_args(["--budget", "tiny"])
    assert args.arms == list(study.ARMS) and args.name == "main"
    for arm in study.ARMS:
        config = study.run_config_of(arm, 0, args)
        assert config.data.dataset == "gain_parts/part04_rel060" and config.train.backbone == "small_cnn_fine"
        assert not config.eval.test and config.eval.eval_examples == 8


def test_baseline_upstream_and_ceilings():
    baseline = settings("baseline")
    assert baseline.gain.am_weight == 0 and baseline.gain.ex_weight == 0
    assert baseline.train.pretrain_epochs == baseline.train.epochs == 2
    upstream = settings("GAIN_upstream")
    assert (upstream.gain.am_weight, upstream.gain.am_batchnorm, upstream.gain.score, upstream.gain.erase) == (
        1.0, "frozen", "softmax", "constant") and upstream.gain.ex_weight == 0
    gain = settings("GAIN")
    assert (gain.gain.am_weight, gain.gain.am_batchnorm, gain.gain.score, gain.gain.erase) == (
        0.1, "batch", "sigmoid", "shift") and gain.gain.ex_weight == 0 and gain.train.pretrain_epochs == 1
    for arm, fraction, am_weight in (("GAIN_ext@10%", 0.1, 0.1), ("GAIN_ext@100%", 1.0, 0.1), ("ex_only@100%", 1, 0)):
        config = settings(arm)
        assert config.gain.ex_weight == 1 and config.data.ex_fraction == fraction and config.gain.am_weight == am_weight
    assert study.family_of(settings("GAIN_ext@10%")) == "GAIN_ext (<= 10% masks)"
    assert study.family_of(settings("GAIN_ext@100%")) is None and study.family_of(baseline) is None
    assert study.ceiling_arms(study.parse_args(["--budget", "tiny"])) == ["GAIN_ext@100%", "ex_only@100%"]
    assert study.grid_floor(study.parse_args([])) == "part_only_grid4"
    assert study.grid_floor(study.parse_args(["--backbone", "small_cnn"])) == "part_only_grid8"


@pytest.mark.parametrize("arm, changed", [
    ("GAIN:erase=constant", {"erase": ("shift", "constant")}),
    ("GAIN:mask_grad=stop", {"mask_grad": ("through", "stop")}),
    ("GAIN:cam_grad=full", {"cam_grad": ("stop", "full")}),
    ("GAIN:cam_grad=full,mask_grad=stop", {"cam_grad": ("stop", "full"), "mask_grad": ("through", "stop")}),
    ("GAIN:score=softmax", {"score": ("sigmoid", "softmax")}),
    ("GAIN:am_batchnorm=frozen", {"am_batchnorm": ("batch", "frozen")}),
    ("GAIN:am_weight=1", {"am_weight": (0.1, 1.0)}),
])
def test_each_self_guided_variant_changes_only_its_setting(arm, changed):
    found = {name.rsplit(".", 1)[-1]: values for name, values in differences(arm).items()}
    assert found == changed
    assert study.family_of(settings(arm)) == "GAIN (self-guided)"


def test_budget_flags_seeds_and_arms():
    args = study.parse_args(["--budget", "full", "--seeds", "0,1,2,3,4", "--epochs", "8"])
    assert args.seeds == [0, 1, 2, 3, 4] and args.epochs == 8 and args.steps_per_epoch == 100
    assert args.eval_examples == 0 and "--eval_examples" not in study.run_flags("GAIN", 3, args)
    assert study.run_name("GAIN:am_weight=1", 3, args) == "part04_rel060_small_cnn_fine_GAIN_am_weight_1_seed3"
    added = study.parse_args(["--arm", "GAIN:sigma=0.25=--am_weight 0.1 --sigma 0.25", "--arms", "baseline",
                              "GAIN:sigma=0.25"])
    assert study.run_config_of("GAIN:sigma=0.25", 0, added).gain.sigma == 0.25 and added.name.startswith("arms-")


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "0,x"], "comma-separated"),
    (["--seeds", "1,1"], "distinct"),
    (["--budget", "huge"], "invalid choice"),
    (["--arms", "nothing"], "unknown arm"),
    (["--pretrain_epochs", "2"], "--pretrain_epochs"),
    (["--arm", "bad"], "NAME=FLAGS"),
    (["--arm", "x=--test", "--arms", "baseline", "x"], "blind to test"),
    (["select", "--arms", "GAIN"], "needs the baseline"),
    (["dose", "--configs", "part03_rel060"], "unknown gain_parts config"),
    (["--figure_images", "51"], "--figure_images"),
    (["--ex_fraction", "0"], "--ex_fraction"),
])
def test_bad_flags_exit_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as error:
        study.parse_args(["--budget", "tiny", *argv])
    assert error.value.code == 2 and message in capsys.readouterr().err


def test_test_and_figure_on_test_refuse_without_selection(tmp_path):
    argv = ["--budget", "tiny", "--out", str(tmp_path), "--logdir", str(tmp_path / "runs")]
    with pytest.raises(SystemExit, match="no selection file"):
        study.main(["test", *argv])
    with pytest.raises(SystemExit, match="no selection file"):
        study.main(["figure", "--split", "test", *argv])
    with pytest.raises(SystemExit, match="no finished run"):
        study.main(["select", *argv])


def test_the_two_stage_study_screen_then_confirm(tmp_path, capsys):
    """The screen holds every arm a target chooses from (not the ceilings); the confirmation's arms come from the
    screen's selection file and are refused without it; PxAP does the choosing."""
    screen = study.parse_args(["--budget", "tiny", "--study", "screen", "--out", str(tmp_path)])
    assert screen.name == "screen" and "GAIN_ext@100%" not in screen.arms and "ex_only@100%" not in screen.arms
    families = {study.family_of(study.run_config_of(arm, 0, screen)) for arm in screen.arms}
    assert families == {None, "GAIN (self-guided)", "GAIN_ext (<= 10% masks)"}
    assert {target.choose_on for target in study.TARGETS} == {"pxap"}
    confirm = ["--budget", "tiny", "--study", "confirm", "--out", str(tmp_path)]
    with pytest.raises(SystemExit) as error:
        study.parse_args(confirm)
    assert error.value.code == 2 and "screen.selection.json" in capsys.readouterr().err
    for chosen, arms in (("GAIN:cam_grad=full", ["baseline", "GAIN:cam_grad=full", "GAIN_ext@10%", "ex_only@100%"]),
                         (None, ["baseline", "GAIN_ext@10%", "ex_only@100%"])):
        (tmp_path / "screen.selection.json").write_text(json.dumps(
            {"targets": {study.TARGETS[0].name: {"arm": chosen}}}))
        args = study.parse_args(confirm)
        assert args.arms == arms and args.name == "confirm"
        assert study.parse_args([*confirm, "--arms", "baseline", "GAIN"]).name.startswith("arms-")


def test_figure_rows_add_each_erasing_arm_s_erased_images(tmp_path):
    """An arm in `erased` gets a second row (the images its L_am sees); the others one."""
    import numpy as np
    import parts_probe
    from PIL import Image

    rng = np.random.default_rng(0)
    figure = {"images": rng.normal(size=(3, 16, 16, 3)).astype(np.float32), "masks": np.zeros((3, 16, 16), int),
              "a": rng.uniform(size=(3, 16, 16)), "b": rng.uniform(size=(3, 16, 16))}
    heights = []
    for erased in ({}, {"b": rng.normal(size=(3, 16, 16, 3)).astype(np.float32)}):
        parts_probe.save_figure(str(tmp_path / "f.png"), figure, ["a", "b"], erased=erased)
        heights.append(Image.open(tmp_path / "f.png").size[1])
    assert heights[1] - heights[0] == heights[0] // 4  # 4 rows of equal height, then 5


@pytest.fixture
def small_parts(tmp_path, monkeypatch):
    from gain_jax.data import parts

    monkeypatch.setattr(parts, "SPLIT_SIZES", {"train": 16, "validation": 8, "test": 8})
    data_dir = tmp_path / "tfds"
    data_dir.mkdir()
    return str(data_dir)


@pytest.mark.slow
def test_tiny_study_train_select_test_figure_and_dose(small_parts, tmp_path, capsys, monkeypatch):
    # 100 resamples instead of 1000: what is checked (intervals written, each bracketing its mean) does not depend on
    # their number, and the nine hundred more cost about 14 CPU-s (141 -> 127 measured)
    monkeypatch.setattr(study, "BOOTSTRAP_RESAMPLES", 100)
    out, logdir = tmp_path / "out", tmp_path / "runs"
    # the baseline and the self-guided arm, the two ends of a comparison: a third, GAIN_ext@10%, cost 35 CPU-s (its
    # step's compile and training; 120 -> 85 measured alone) for the paths these two take; GAIN_ext trains on
    # gain_parts in tests/test_parts_probe.py and its family's empty choice is checked below
    common = ["--budget", "tiny", "--seeds", "0,1", "--arms", "baseline", "GAIN",
              "--data_dir", small_parts, "--logdir", str(logdir), "--out", str(out), "--figure_images", "4"]
    # each arm's two seeds as one seed sweep (--together): select, test, figure and dose read its runs as any
    assert study.main(["train", *common, "--together"]) == 0
    assert capsys.readouterr().out.count("seeds 0,1 together as one seed sweep") == 2
    name = "arms-baseline+GAIN"
    assert "| GAIN | 1 |" in (out / f"{name}.train.md").read_text()
    for seed in (0, 1):
        assert os.path.isfile(logdir / f"{study.run_name('GAIN', seed, study.parse_args(common))}.log")
    assert study.main(["select", *common]) == 0
    selection = json.loads((out / f"{name}.selection.json").read_text())
    assert set(selection["targets"]) == {t.name for t in study.TARGETS}
    for run in selection["validation"].values():
        assert 0 <= run["body_share"] <= 1 and 0 < run["p_image"] < 1 and run["num_images"] == 8
    # each chosen arm is of its target's family, or none passed the mAP tolerance
    assert selection["targets"]["self-guided body share"]["arm"] in ("GAIN", None)
    assert selection["targets"]["GAIN_ext body share"]["arm"] is None  # the family has no arm in this study
    assert study.main(["test", *common]) == 0
    result = json.loads((out / f"{name}.test.json").read_text())
    assert result["references"]["whole_object"]["pxap"] == pytest.approx(1.0)
    assert result["references"]["part_only_pixels"]["part_share"] == 1.0
    assert {run["arm"] for run in result["per_run"].values()} >= {"baseline"}
    for interval in result["bootstrap"]["baseline"].values():
        assert interval["low"] <= interval["mean"] <= interval["high"]
    assert "95% t-interval" in (out / f"{name}.test.md").read_text()
    # the held-out check, after test (refused without its result): the same runs on images of a held-out stream
    heldout = ["heldout", *common, "--heldout_seed", "7", "--heldout_images", "6"]
    (out / f"{name}.test.json").rename(tmp_path / "test.json")
    with pytest.raises(SystemExit, match="no test result"):
        study.main(heldout)
    (tmp_path / "test.json").rename(out / f"{name}.test.json")
    assert study.main(heldout) == 0
    held = json.loads((out / f"{name}.heldout.json").read_text())
    assert (held["heldout"]["seed"], held["heldout"]["images"], held["heldout"]["stream"]) == (7, 6, "heldout7")
    assert held["per_run"].keys() == result["per_run"].keys() and held["verdicts"].keys() == result["verdicts"].keys()
    for run in held["per_run"].values():
        assert run["num_images"] == 6 and 0 <= run["body_share"] <= 1
    for verdict in held["verdicts"].values():
        assert verdict["low"] <= verdict["mean"] <= verdict["high"]
    assert held["references"]["whole_object"]["pxap"] == pytest.approx(1.0)
    text = (out / f"{name}.heldout.md").read_text()
    assert "held-out (6 images)" in text and "stored nowhere" in text and "95% t-interval" in text
    capsys.readouterr()
    # the dose-response on two configs, one seed, the baseline alone (a second arm would train and compile two more
    # programs on part02_rel100, about 13 CPU-s, for rows the loop writes alike); then the figures (overlays of test
    # images, the dose curve, which draws the floor and the whole-object reference beside the arm)
    dose = ["--budget", "tiny", "--seeds", "0", "--data_dir", small_parts, "--logdir", str(logdir), "--out", str(out),
            "--configs", "part04_rel060", "part02_rel100", "--dose_arms", "baseline"]
    assert study.main(["dose", *dose]) == 0
    rows = json.loads((out / "dose.json").read_text())["rows"]
    assert [(row["config"], row["arm"]) for row in rows] == [
        (config, arm) for config in ("part04_rel060", "part02_rel100")
        for arm in ("baseline", "part_only_grid4", "whole_object")]
    small, large = rows[3]["part_area_share"], rows[0]["part_area_share"]
    assert 0 < small < large < 0.1  # 2% and 4% parts
    assert "reusing" in capsys.readouterr().out  # the baseline run of part04_rel060 exists already
    assert study.main(["figure", "--split", "test", *common]) == 0
    assert (out / f"{name}.test.png").stat().st_size > 0 and (out / "dose.png").stat().st_size > 0
    capsys.readouterr()
    assert study.main(["curves", *common]) == 0
    curves = (out / f"{name}.curves.md").read_text()
    assert curves == capsys.readouterr().out
    for arm in ("baseline", "GAIN"):
        assert f"{arm} (mean over 2 seeds)" in curves
    assert "| 2 | on |" in curves and "| 1 | off |" in curves  # GAIN's classification-only epoch, then attention


def test_calibrate_stops_at_the_cheapest_setting_with_room_and_keeps_each_ceiling_apart(tmp_path, monkeypatch):
    """`calibrate` trains the baseline once per length and the ceiling once per setting, each in its own folder,
    and stops at the first setting (cheapest first) whose ceiling clears the baseline's PxAP by the margin."""
    trained = []
    monkeypatch.setattr(study, "ensure_runs", lambda arms, args: trained.append(
        (tuple(arms), args.epochs, args.ex_weight, os.path.relpath(args.logdir, str(tmp_path / "runs")))))

    evaluations = []

    def evaluate_run(arm, seed, split, args):  # the ceiling gains 0.1 per extra epoch factor and with weight 10
        assert split == "validation"
        evaluations.append(os.path.relpath(args.logdir, str(tmp_path / "runs")))
        pxap = 0.6 if arm == "baseline" else 0.62 + 0.1 * (args.epochs // 2 - 1) + (0.03 if args.ex_weight > 1 else 0)
        return {"pxap": pxap, "arm": arm}

    monkeypatch.setattr(study, "evaluate_run", evaluate_run)
    monkeypatch.setattr(study, "summarize", lambda record: {"pxap": record["pxap"], "body_share": 0.7,
                                                            "body_recall@0.5": 0.3, "mAP": 1.0})
    argv = ["calibrate", "--budget", "tiny", "--out", str(tmp_path), "--logdir", str(tmp_path / "runs")]
    assert study.main(argv) == 0
    # tiny: 2 epochs; x1 w1 (+0.02), x1 w10 (+0.05), x3 w1 (+0.22 >= 0.15): stops there
    assert trained == [(("baseline",), 2, 1.0, "calibration/epochs2"),
                       (("ex_only@100%",), 2, 1.0, "calibration/epochs_x1_ex_weight_1"),
                       (("baseline",), 2, 10.0, "calibration/epochs2"),
                       (("ex_only@100%",), 2, 10.0, "calibration/epochs_x1_ex_weight_10"),
                       (("baseline",), 6, 1.0, "calibration/epochs6"),
                       (("ex_only@100%",), 6, 1.0, "calibration/epochs_x3_ex_weight_1")]
    # each run folder evaluated once: the 2-epoch baseline serves both weights
    assert evaluations == ["calibration/epochs2", "calibration/epochs_x1_ex_weight_1",
                           "calibration/epochs_x1_ex_weight_10", "calibration/epochs6",
                           "calibration/epochs_x3_ex_weight_1"]
    record = json.loads((tmp_path / "calibration.json").read_text())
    assert record["chosen"] == "epochs_x3_ex_weight_1" and len(record["rows"]) == 3
    assert [round(row["headroom"], 6) for row in record["rows"]] == [0.02, 0.05, 0.22]
    assert "chosen: epochs_x3_ex_weight_1" in (tmp_path / "calibration.md").read_text()
