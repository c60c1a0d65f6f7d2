"""experiments/biased_shapes.py end to end on tiny settings: two arms, one seed, two steps per epoch, 16
evaluation images; then --reuse re-reads the finished runs, `select` chooses on validation (never reading a test
split) and `test` evaluates the choice on test_unbiased."""
import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "biased_shapes.py")


def load_script():
    spec = importlib.util.spec_from_file_location("biased_shapes", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_argv(data_dir, tmp_path):
    return ["--arms", "baseline", "GAIN_ext", "--seeds", "0", "--epochs", "2", "--pretrain_epochs", "1",
            "--steps_per_epoch", "2", "--batch_size", "8", "--heatmap_images", "2", "--data_dir", data_dir,
            "--logdir", str(tmp_path / "runs"), "--out", str(tmp_path / "out"),
            "--train_arg=--image_size=32", "--train_arg=--eval_examples=16"]


def test_arms_studies_and_flags():
    script = load_script()
    for study, arms in script.STUDIES.items():
        assert set(arms) <= set(script.ARMS), study
    parser = script.build_parser()
    args = parser.parse_args(["--arm", "GAIN_slow=--am_weight 1 --lr 1e-4", "--arms", "baseline", "GAIN_slow"])
    script.check_args(args, parser)
    assert args.name == "arms-baseline+GAIN_slow"
    flags = script.run_flags("GAIN_slow", 0, args)
    assert "--test" not in flags and flags[-4:] == ["--am_weight", "1", "--lr", "1e-4"]
    config = script.run_config_of("baseline", 0, args)
    assert config.train.pretrain_epochs == config.train.epochs and config.gain.am_weight == 0
    assert not config.eval.test  # training is blind to test_unbiased
    with pytest.raises(SystemExit):
        script.check_args(parser.parse_args(["--arms", "baseline", "--train_arg=--test"]), parser)
    args = parser.parse_args(["select", "--study", "main"])
    script.check_args(args, parser)
    assert args.command == "select" and script.selection_path(args).endswith("main.selection.json")
    configs = {arm: script.run_config_of(arm, 0, args) for arm in args.arms}
    assert [arm for arm in args.arms if script.FAMILIES["GAIN_ext (<= 10% masks)"](configs[arm])] == ["GAIN_ext"]
    assert [arm for arm in args.arms if script.FAMILIES["GAIN (self-guided)"](configs[arm])] == [
        "GAIN_upstream", "GAIN"]
    args = parser.parse_args(["--study", "mask_fraction"])
    script.check_args(args, parser)
    assert args.name == "mask_fraction" and args.arms == list(script.STUDIES["mask_fraction"])
    curve, references = script.fraction_arms(args)
    assert [fraction for fraction, _ in curve] == [0.01, 0.02, 0.05, 0.1, 1.0]
    assert references == ["baseline", "GAIN", "ex_only@100%"]
    assert script.has_fraction_curve(curve)
    args = parser.parse_args(["--study", "oversample"])
    script.check_args(args, parser)
    assert not script.has_fraction_curve(script.fraction_arms(args)[0])  # several arms at 10%: no curve
    with pytest.raises(SystemExit):
        script.check_args(parser.parse_args(["--arms", "nope"]), parser)
    # issue 20's study at convergence, on gain_shapes 3.0.0: the controls' settings; the oracle needs 3.0.0
    args = parser.parse_args(["--dataset", "gain_shapes:3.0.0", "--study", "converged", "--epochs", "12"])
    script.check_args(args, parser)
    assert script.data_version(args.dataset) == "3.0.0" and script.data_version("gain_shapes") == "2.0.0"
    assert script.run_flags("oracle", 0, args)[:2] == ["--dataset", "gain_shapes:3.0.0"]
    oracle, control = (script.run_config_of(arm, 0, args) for arm in ("oracle", "baseline:oversample"))
    assert oracle.data.train_split == "train_unbiased" and oracle.train.pretrain_epochs == 12
    assert (control.gain.ex_weight, control.data.ex_fraction, control.data.ex_oversample) == (0, 0.1, 0.5)
    with pytest.raises(SystemExit):
        script.check_args(parser.parse_args(["--study", "converged"]), parser)  # 2.0.0 has no train_unbiased


@pytest.mark.slow
def test_tiny_study_end_to_end_and_reuse(shapes_data_dir, tmp_path, capsys, monkeypatch):
    import gain_jax.data as gd

    script = load_script()
    assert script.main(tiny_argv(shapes_data_dir, tmp_path)) == 0
    name = "arms-baseline+GAIN_ext"
    with open(tmp_path / "out" / f"{name}.json") as handle:
        record = json.load(handle)
    assert set(record["summary"]) == {"baseline", "GAIN_ext"}
    for arm, metrics in record["summary"].items():
        assert set(metrics) == {key for key, *_ in script.METRICS}
        for key, value in metrics.items():
            assert 0.0 <= value["mean"] <= 1.0 or key == "val_unbiased_mAP_conflicting", (arm, key, value)
            assert list(value["per_seed"]) == ["0"]
        assert metrics["val_unbiased_cam_mIoU"]["per_seed"]["0"] == record["per_run"][
            f"{script.run_name(arm, 0)}"]["val_unbiased_cam_mIoU"]
    assert set(record["floors_validation_unbiased"]) == {"zero", "centre", "random"}
    assert set(record["per_run"]) == {"baseline_seed0", "GAIN_ext_seed0"}
    assert "--test" not in record["train_commands"]["baseline_seed0"]
    for run in record["per_run"]:  # training evaluated no test split
        with open(tmp_path / "runs" / run / "metrics.json") as handle:
            assert set(json.load(handle)["final"]) == {"validation", "validation_unbiased"}
    assert os.path.getsize(tmp_path / "out" / f"{name}.png") > 0
    text = (tmp_path / "out" / f"{name}.md").read_text()
    assert "validation_unbiased mAP" in text and "floors on validation_unbiased" in text
    assert "validation_unbiased CAM mIoU" in text and "test_unbiased" not in text
    assert os.path.isfile(tmp_path / "runs" / "baseline_seed0.log")
    capsys.readouterr()

    # test before select is refused; select reads validation splits only and writes the choice
    splits_read = []
    input_pipeline = gd.input_pipeline

    def recorded(name, split, **options):
        splits_read.append(split)
        return input_pipeline(name, split, **options)
    monkeypatch.setattr(gd, "input_pipeline", recorded)
    with pytest.raises(SystemExit, match="no selection file"):
        script.main(["test"] + tiny_argv(shapes_data_dir, tmp_path))
    assert not os.path.exists(tmp_path / "out" / f"{name}.test.json")
    assert not [split for split in splits_read if split.startswith("test")]
    assert script.main(["select"] + tiny_argv(shapes_data_dir, tmp_path)) == 0
    assert not [split for split in splits_read if split.startswith("test")]
    assert "validation_unbiased[:16]" in splits_read  # --eval_examples 16, as the runs' evaluation
    with open(tmp_path / "out" / f"{name}.selection.json") as handle:
        selection = json.load(handle)
    assert selection["targets"]["mAP"]["arm"] == "GAIN_ext" and selection["targets"]["CAM"]["arm"] == "GAIN_ext"
    assert selection["targets"]["validation cost"]["arm"] == "GAIN_ext" == selection["targets"]["PxAP"]["arm"]
    assert selection["controls"] == []  # every arm but the baseline is a candidate of a target here
    assert selection["targets"]["self-guided CAM"]["arm"] is None  # no GAIN arm in this study
    assert set(selection["thresholds"]) == {"baseline", "GAIN_ext"} and "test" not in json.dumps(
        selection["validation_unbiased"])
    capsys.readouterr()
    assert script.main(["test"] + tiny_argv(shapes_data_dir, tmp_path)) == 0
    assert splits_read.count("test_unbiased[:16]") == 2  # the two chosen runs (baseline, GAIN_ext), once each
    with open(tmp_path / "out" / f"{name}.test.json") as handle:
        tested = json.load(handle)
    assert set(tested["verdicts"]) == {"mAP", "conflicting mAP", "PxAP", "CAM", "validation cost"}
    assert set(tested["comparisons"]) == {"GAIN_ext - baseline"}
    assert set(tested["comparisons"]["GAIN_ext - baseline"]) == {"mAP", "mAP_conflicting", "PxAP", "cam_mIoU",
                                                                 "validation_mAP"}
    assert tested["verdicts"]["mAP"]["verdict"].startswith("undecided")  # one seed: no interval
    boot = tested["bootstrap"]["GAIN_ext"]["mAP"]
    assert boot["low"] <= boot["mean"] <= boot["high"] and boot["n"] == 16
    assert tested["per_run"]["GAIN_ext_seed0"]["cam_threshold"] == selection["thresholds"]["GAIN_ext"]["threshold"]
    capsys.readouterr()

    assert script.main(tiny_argv(shapes_data_dir, tmp_path) + ["--reuse"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("reusing") == 2 and "  training " not in printed

    # the mask-coverage diagnostic reads the same finished runs (validation_unbiased), trains nothing
    path = os.path.join(ROOT, "experiments", "mask_coverage.py")
    spec = importlib.util.spec_from_file_location("mask_coverage", path)
    coverage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(coverage)
    study_flags = tiny_argv(shapes_data_dir, tmp_path)[5:]  # after --arms A B --seeds 0: the runs' settings
    del study_flags[study_flags.index("--out"):study_flags.index("--out") + 2]
    out = tmp_path / "out" / "coverage"
    assert coverage.main(["--arms", "baseline", "GAIN_ext", "--seeds", "0", "--out", str(out), *study_flags]) == 0
    printed = capsys.readouterr().out
    assert printed.count("| baseline |") == 1 and printed.count("| GAIN_ext |") == 1
    with open(str(out) + ".json") as handle:
        runs = json.load(handle)["runs"]
    for arm in ("baseline", "GAIN_ext"):
        values = runs[arm]["0"]
        assert values["pairs"] > 0 and 0.0 < values["object_pixels"] < 1.0
        for key, _ in coverage.COLUMNS:
            assert 0.0 <= values[key] <= 1.0, (arm, key, values[key])
    with pytest.raises(SystemExit, match="no finished run"):
        coverage.main(["--arms", "GAIN", "--seeds", "0", *study_flags])
