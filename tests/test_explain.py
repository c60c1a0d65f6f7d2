"""gain_jax.viz pictures and the `python -m gain_jax.explain` CLI on a checkpoint written here (no TF)."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

import gain_jax as gj
from gain_jax import checkpoint, explain, viz
from gain_jax.config import Config, DataConfig, TrainConfig, config_to_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASS_NAMES = ["circle", "square", "triangle"]
reference_class_cams = jax.jit(gj.class_cams, static_argnums=(0, 3))


def test_jet_endpoints_and_midpoint():
    np.testing.assert_allclose(viz.jet(np.array([0.0, 0.5, 1.0])),
                               [[0.0, 0.0, 0.5], [0.5, 1.0, 0.5], [0.5, 0.0, 0.0]], atol=1e-6)


def test_overlay_blends_half_and_rescales_to_255():
    image = np.zeros((2, 2, 3), np.uint8)
    out = viz.overlay(image, np.ones((2, 2)))
    # jet(1) = (0.5, 0, 0) -> 63.75 red after the 0.5 blend with black, rescaled so the peak is 255
    np.testing.assert_array_equal(out[..., 0], 255)
    np.testing.assert_array_equal(out[..., 1:], 0)


def test_normalize_round_trips():
    pixels = np.arange(48, dtype=np.uint8).reshape(4, 4, 3) * 5
    np.testing.assert_array_equal(viz.denormalize(viz.normalize(pixels)), pixels)


def test_grid_layout_scale_and_captions():
    tile = np.zeros((4, 5, 3), np.uint8)
    picture = viz.grid([[tile, tile, tile], [tile, tile, tile]], captions=["a\nb", "c"], padding=2, scale=2,
                       line_height=10)
    # rows: 2 caption lines (20 px) + 8 px image + 2 px padding each, plus the top padding
    assert picture.shape == (2 + 2 * (20 + 8 + 2), 2 + 3 * (10 + 2), 3)
    assert (picture[22:30, 2:12] == 0).all()  # the first image, enlarged, below its caption
    with pytest.raises(ValueError, match="2 captions for 1 rows"):
        viz.grid([[tile]], captions=["a", "b"])


def test_save_png_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "sub" / "x.png"
    viz.save_png(str(path), np.full((3, 3, 3), 7, np.uint8))
    assert os.listdir(tmp_path / "sub") == ["x.png"]
    assert np.asarray(Image.open(path)).max() == 7


def save_run_checkpoint(directory, config: dict):
    """A small_cnn checkpoint (step 5) with `config` as the meta record's config."""
    model = gj.build_model("small_cnn", num_classes=len(CLASS_NAMES), dropout_rate=0.0)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
    state = gj.create_train_state(variables, optax.adam(1e-3))
    manager = checkpoint.open_manager(str(directory))
    checkpoint.save(manager, 5, state, {"epoch": 1, "step_in_epoch": 0, "global_step": 5, "config": config})
    manager.wait_until_finished()
    return model, variables


def run_config_record(cam: str = "gradcam") -> dict:
    """The config record of gain_jax.train_loop: the config by section, then the derived facts."""
    config = Config(gain=gj.GainConfig(cam=cam), data=DataConfig(image_size=32), train=TrainConfig(dropout=0.0))
    return {**config_to_dict(config), "num_classes": len(CLASS_NAMES), "class_names": CLASS_NAMES,
            "image_mean": list(viz.IMAGENET_MEAN), "image_std": list(viz.IMAGENET_STD)}


@pytest.fixture(scope="module")
def run_checkpoint(tmp_path_factory):
    """A small_cnn checkpoint with the meta record the training loop writes."""
    directory = tmp_path_factory.mktemp("run") / "checkpoints"
    model, variables = save_run_checkpoint(directory, run_config_record())
    return directory, model, variables


@pytest.fixture()
def photo(tmp_path):
    path = tmp_path / "my photo.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (30, 45, 3), dtype=np.uint8)).save(path)
    return path


def test_explain_top_classes_match_the_model(run_checkpoint, photo, tmp_path, capsys):
    directory, model, variables = run_checkpoint
    out_dir = tmp_path / "out"
    written = explain.explain(explain.build_parser().parse_args(
        ["--checkpoint", str(directory), "--top", "2", "--out_dir", str(out_dir), str(photo)]))
    batch = viz.normalize(explain.resize_image(explain.load_image(str(photo)), 32))[None]
    logits, cams = reference_class_cams(model, variables, jnp.asarray(batch), gj.GainConfig())
    top = np.argsort(-np.asarray(logits)[0])[:2]
    assert [os.path.basename(p) for p in written] == [f"my_photo_{CLASS_NAMES[c]}.png" for c in top]
    overlay = np.asarray(Image.open(written[0]))
    assert overlay.shape == (30, 45, 3)
    expected = viz.overlay(explain.load_image(str(photo)), explain.resize_map(np.asarray(cams)[0, top[0]], 30, 45))
    # explain's program against the test's (another compile) may round a blended pixel to the neighbouring uint8
    assert np.abs(overlay.astype(int) - expected).max() <= 1
    assert f"{CLASS_NAMES[top[0]]} p=" in capsys.readouterr().out


@pytest.mark.parametrize("layout", ["nested, gradcam_pp", "flat (earlier runs)"])
def test_explain_uses_the_runs_config_layout_and_cam_method(layout, photo, tmp_path):
    if layout.startswith("nested"):
        record, gain_cfg = run_config_record(cam="gradcam_pp"), gj.GainConfig(cam="gradcam_pp")
    else:
        record = {"backbone": "small_cnn", "class_names": CLASS_NAMES, "image_size": 32, "dropout": 0.0,
                  "fill": "0", "image_mean": list(viz.IMAGENET_MEAN), "image_std": list(viz.IMAGENET_STD)}
        gain_cfg = gj.GainConfig()
    model, variables = save_run_checkpoint(tmp_path / "checkpoints", record)
    written = explain.explain(explain.build_parser().parse_args(
        ["--checkpoint", str(tmp_path), "--classes", "square", "--out_dir", str(tmp_path / "out"), str(photo)]))
    image = explain.load_image(str(photo))
    batch = viz.normalize(explain.resize_image(image, 32))[None]
    _, cams = reference_class_cams(model, variables, jnp.asarray(batch), gain_cfg)
    if gain_cfg.cam != "gradcam":  # the method matters for this image: the check below tells them apart
        _, grad_cams = reference_class_cams(model, variables, jnp.asarray(batch), gj.GainConfig())
        assert np.abs(np.asarray(cams)[0, 1] - np.asarray(grad_cams)[0, 1]).max() > 0.05
    expected = viz.overlay(image, explain.resize_map(np.asarray(cams)[0, 1], *image.shape[:2]))
    assert np.abs(np.asarray(Image.open(written[0])).astype(int) - expected).max() <= 1


def test_explain_cli_errors_are_one_line(run_checkpoint, photo, tmp_path, capsys):
    directory = str(run_checkpoint[0])

    def run(*args):
        assert explain.main(list(args)) == 1
        errors = capsys.readouterr().err.splitlines()
        assert len(errors) == 1 and errors[0].startswith("explain: error:"), errors
        return errors[0]

    assert "unknown class 'dog'" in run("--checkpoint", directory, "--classes", "dog", str(photo))
    assert "cannot read image" in run("--checkpoint", directory, str(tmp_path / "missing.png"))
    assert "does not exist" in run("--checkpoint", str(tmp_path / "nowhere"), str(photo))
    assert "no checkpoint step 7" in run("--checkpoint", directory, "--step", "7", str(photo))


@pytest.mark.slow
def test_explain_imports_no_tensorflow_or_torch():
    code = ("import sys, gain_jax.explain, gain_jax.checkpoint; "
            "print('tensorflow' in sys.modules, 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["False", "False"], result.stderr[-2000:]
