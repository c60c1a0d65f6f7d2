"""experiments/biased_shapes.py end to end on tiny settings: two arms, one seed, two steps per epoch, 16
evaluation images; then --reuse re-reads the finished runs, `select` chooses on validation (never reading a test
split) and `test` evaluates the choice on test_unbiased; --together trains one arm's two seeds as one seed sweep
whose runs equal those trained alone. experiments/protocol.py's training plan (which seeds train together)."""
import dataclasses
import json
import os
import sys

import numpy as np
import pytest
from test_train_cli import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "biased_shapes.py")
sys.path.insert(0, os.path.join(ROOT, "experiments"))  # protocol.py, as the scripts import it


def load_script():
    return load_file(SCRIPT, "biased_shapes")


def tiny_argv(data_dir, tmp_path):
    # --pretrain_epochs 0: GAIN_ext's attention from its first epoch, one train step compiled (a classification-only
    # epoch would compile it a second one: 80.6 -> 73.3 CPU-s measured alone); what is checked (the study's records,
    # selection, test, reuse, the baseline's sweep, mask coverage) does not depend on GAIN_ext's schedule, and the
    # baseline classifies only whatever it is (its arm sets --pretrain_epochs to --epochs)
    return ["--arms", "baseline", "GAIN_ext", "--seeds", "0", "--epochs", "2", "--pretrain_epochs", "0",
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


def test_default_study_is_train_pys_configuration_and_its_chain_rule(capsys):
    """--study default at --steps_per_epoch 93: its arms are train.py's default run (the mask loss alone, the
    rule's choice) and that run with --am_weight 0.1 (GAIN_ext, the former default); the chain moves to the next
    arm only when the interval's lower bounds clear both margins."""
    from gain_jax import config as run_config

    script = load_script()
    parser = script.build_parser()
    args = parser.parse_args(["select", "--study", "default", "--steps_per_epoch", "93", "--seeds", "0", "1", "2"])
    script.check_args(args, parser)
    assert tuple(args.arms) == script.DEFAULT_CHAIN
    gain_ext, mask_loss = (script.run_config_of(arm, 0, args) for arm in ("GAIN_ext@100%", "ex_only@100%"))
    default = run_config.Config()
    assert gain_ext.gain == dataclasses.replace(default.gain, am_weight=0.1)
    assert (mask_loss.gain.am_weight, mask_loss.gain.ex_weight) == (default.gain.am_weight, default.gain.ex_weight)
    for arm in (gain_ext, mask_loss):
        assert arm.data.ex_fraction == default.data.ex_fraction and arm.train.steps_per_epoch == 93
        assert (arm.train.epochs, arm.train.pretrain_epochs, arm.train.lr, arm.train.batch_size) == (
            default.train.epochs, default.train.pretrain_epochs, default.train.lr, default.train.batch_size)

    def runs(unbiased, biased):  # {arm: per-seed values} -> select's per_run and the runs' metrics
        per_run, results = {}, {}
        for arm in unbiased:
            for seed in args.seeds:
                per_run[script.run_name(arm, seed)] = {"mAP": unbiased[arm][seed], "validation_mAP": biased[arm][seed]}
                split = {metric: unbiased[arm][seed] for metric in script.REFERENCE_METRICS}
                results[(arm, seed)] = {"final": {name: split for name in script.REFERENCE_SPLITS}}
        return per_run, results

    biased = {arm: [0.90, 0.91, 0.92] for arm in script.DEFAULT_CHAIN}
    unbiased = {"baseline": [0.38, 0.40, 0.39], "ex_only@100%": [0.50, 0.53, 0.51],
                "GAIN_ext@100%": [0.51, 0.52, 0.52]}  # L_am: +0.003 [-0.025, +0.032]: contains zero
    choice = script.default_choice(*runs(unbiased, biased), args)
    assert choice["default"] == "ex_only@100%" and [step["moves"] for step in choice["steps"]] == [True, False]
    assert choice["steps"][1]["against"] == "ex_only@100%"
    assert choice["train_flags"][:2] == ["--am_weight", "0"]
    assert choice["baseline_trained_as_long"]["validation_unbiased"]["mAP"] == pytest.approx(0.39)
    unbiased["GAIN_ext@100%"] = [0.55, 0.58, 0.56]
    assert script.default_choice(*runs(unbiased, biased), args)["default"] == "GAIN_ext@100%"
    biased["GAIN_ext@100%"] = [0.87, 0.88, 0.89]  # -0.03 on biased validation: the cost margin stops it
    assert script.default_choice(*runs(unbiased, biased), args)["default"] == "ex_only@100%"
    unbiased["ex_only@100%"] = [0.37, 0.42, 0.38]  # no clear gain over the baseline: GAIN_ext is compared with it
    choice = script.default_choice(*runs(unbiased, {arm: [0.9, 0.91, 0.92] for arm in biased}), args)
    assert [step["against"] for step in choice["steps"]] == ["baseline", "baseline"]
    assert choice["default"] == "GAIN_ext@100%"
    assert "default: GAIN_ext@100%" in capsys.readouterr().out


def test_together_groups_each_arms_seeds_and_falls_back_where_a_sweep_cannot_train(capsys):
    import protocol

    script = load_script()
    parser = script.build_parser()
    args = parser.parse_args(["--arms", "baseline", "GAIN", "--seeds", "0", "1", "--together"])
    script.check_args(args, parser)
    assert args.together and not parser.parse_args([]).together  # one run at a time by default
    assert protocol.run_groups(args.arms, args.seeds, True) == [("baseline", [0, 1]), ("GAIN", [0, 1])]
    assert protocol.run_groups(args.arms, args.seeds, False) == [("baseline", [0]), ("GAIN", [0]), ("baseline", [1]),
                                                                 ("GAIN", [1])]
    union = script.run_config_of("GAIN", 0, args)
    assert protocol.sweep_refusal(union) is None
    assert protocol.sweep_batches("GAIN", [0, 1], union) == [[0, 1]]
    assert protocol.sweep_batches("GAIN", [1], union) == [[1]] and protocol.sweep_batches("GAIN", [], union) == []
    assert capsys.readouterr().out == ""
    args = parser.parse_args(["--arms", "GAIN", "--seeds", "0", "1", "--together", "--train_arg=--mode=per_label"])
    script.check_args(args, parser)
    per_label = script.run_config_of("GAIN", 0, args)
    assert "per_label" in protocol.sweep_refusal(per_label)
    assert protocol.sweep_batches("GAIN", [0, 1], per_label) == [[0], [1]]
    assert "GAIN: seeds 0,1 trained one after another, not together: --seeds cannot train --mode per_label" in (
        capsys.readouterr().out)
    flags = script.run_flags("GAIN", 1, args)
    swept = protocol.sweep_flags(flags, [0, 1])
    assert "--seed" not in swept and swept[swept.index("--seeds") + 1] == "0,1"
    assert swept[swept.index("--run_name") + 1] == "GAIN" and flags[flags.index("--run_name") + 1] == "GAIN_seed1"
    # runs that differ in more than their seed are refused before anything is written
    other = script.run_config_of("baseline", 1, args)
    with pytest.raises(ValueError, match="more than its seed"):
        protocol.train_runs({0: per_label, 1: other}, {0: flags, 1: flags}, "biased_shapes: GAIN")


@pytest.mark.slow
def test_tiny_study_end_to_end_and_reuse(shapes_data_dir, tmp_path, capsys, monkeypatch):
    import gain_jax.data as gd

    script = load_script()
    monkeypatch.setattr(script, "BOOTSTRAP_RESAMPLES", 100)  # the intervals' checks do not depend on their number
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
    from PIL import Image

    for figure in (f"{name}.test.png", f"{name}.png"):  # committed figures are palette PNGs
        with Image.open(tmp_path / "out" / figure) as image:
            assert image.mode == "P" and image.size[0] > 200, figure
    capsys.readouterr()

    assert script.main(tiny_argv(shapes_data_dir, tmp_path) + ["--reuse"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("reusing") == 2 and "  training " not in printed

    # --together: the baseline's seeds 0 and 1 as one seed sweep (in another --logdir); each run's folder, record
    # and log as a run trained alone writes them, seed 0's results those of its run trained alone above (to float32
    # rounding); --reuse then reads both as finished runs
    together = ["--arms", "baseline", "--seeds", "0", "1", "--together",
                *tiny_argv(shapes_data_dir, tmp_path / "together")[5:]]
    assert script.main(together) == 0
    printed = capsys.readouterr().out
    assert printed.count("  training baseline, seeds 0,1 together as one seed sweep") == 1
    assert printed.count("  done baseline") == 2 and printed.count("divided by 2") == 2
    with open(tmp_path / "together" / "out" / "arms-baseline.json") as handle:
        assert json.load(handle)["per_run"]["baseline_seed1"]["trained_with_seeds"] == [0, 1]
    runs = tmp_path / "together" / "runs"
    histories = {}
    for seed in (0, 1):
        assert os.path.isfile(runs / f"baseline_seed{seed}" / script.RECORD_FILE)
        log = (runs / f"baseline_seed{seed}.log").read_text().splitlines()
        assert f"--run_name baseline_seed{seed} --seed {seed} " in log[0] and "--seeds 0,1" in log[1]
        assert f"seed {seed}: epoch 2/2" in "\n".join(log)
        with open(runs / f"baseline_seed{seed}" / "metrics.json") as handle:
            histories[seed] = json.load(handle)
    with open(tmp_path / "runs" / "baseline_seed0" / "metrics.json") as handle:
        alone = json.load(handle)
    assert histories[0]["status"] == "finished" and histories[0]["config"]["train"] == alone["config"]["train"]
    for key in ("loss", "cl"):
        np.testing.assert_allclose([r[key] for r in histories[0]["steps"]], [r[key] for r in alone["steps"]],
                                   rtol=2e-5, atol=1e-6, err_msg=key)
    for split, result in alone["final"].items():
        assert histories[0]["final"][split]["mAP"] == pytest.approx(result["mAP"], abs=1e-6), split
    assert histories[1]["steps"][0]["loss"] != histories[0]["steps"][0]["loss"]  # the seeds differ
    parser = script.build_parser()
    args = parser.parse_args(together + ["--reuse"])
    script.check_args(args, parser)
    results, seconds, _, sweeps = script.run_all(args)
    assert capsys.readouterr().out.count("  reusing ") == 2 and set(results) == {("baseline", 0), ("baseline", 1)}
    assert set(seconds.values()) == {None} and set(sweeps.values()) == {None}

    # the mask-coverage diagnostic reads the same finished runs (validation_unbiased), trains nothing
    path = os.path.join(ROOT, "experiments", "mask_coverage.py")
    coverage = load_file(path, "mask_coverage")
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
