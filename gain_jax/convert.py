"""Exact import of torchvision weights into the Flax backbones of `gain_jax.models`.

    variables = from_torchvision("vgg19", torch_model.state_dict(), num_classes=20, rng=key)

The mapping is derived from the Flax model's own variable tree (every Flax leaf names exactly one
torch key), so the import always has the structure of `model.init(...)`. Layout conversions:
conv OIHW -> HWIO, Linear (out, in) -> (in, out), and VGG's first classifier layer has its input
rows permuted from torch's NCHW flatten (C, 7, 7) to our NHWC flatten (7, 7, C).

This module imports no torch: torch tensors are read through `.detach().cpu().numpy()`.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gain_jax.models import SMALL_CNN_BATCHNORM, VGG_CFGS, VGG_POOL_SIZE, build_model

__all__ = ["from_torchvision", "torch_key_layout"]

# (collection, leaf name) -> torch parameter / buffer name
_LEAF_TO_TORCH = {
    ("params", "kernel"): "weight",
    ("params", "bias"): "bias",
    ("params", "scale"): "weight",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
_IGNORED_SUFFIXES = ("num_batches_tracked",)  # BN's step counter: no Flax counterpart
_MAX_LISTED_PROBLEMS = 12


def _vgg_conv_indices(cfg) -> list[int]:
    """Index inside torchvision's `features` Sequential of each conv (conv, ReLU pairs and pools)."""
    indices, position = [], 0
    for v in cfg:
        if v == "M":
            position += 1
        else:
            indices.append(position)
            position += 2
    return indices


def _torch_module(name: str, module_path: tuple[str, ...]) -> str:
    """torch module prefix of the Flax module at `module_path` (e.g. ("layer2_0", "downsample_bn"))."""
    if name in VGG_CFGS:
        (module,) = module_path
        kind, index = module.rsplit("_", 1)
        if kind == "conv":
            return f"features.{_vgg_conv_indices(VGG_CFGS[name])[int(index)]}"
        return f"classifier.{(0, 3, 6)[int(index)]}"  # fc_0, fc_1, fc_2 between ReLU/Dropout pairs
    if name in SMALL_CNN_BATCHNORM:
        (module,) = module_path
        if module == "fc":
            return "classifier.1"
        kind, index = module.rsplit("_", 1)
        if SMALL_CNN_BATCHNORM[name]:
            return f"features.{4 * int(index) + (0 if kind == 'conv' else 1)}"  # conv, bn, relu, pool
        return f"features.{3 * int(index)}"  # conv, relu, pool: no BN, so only convs have weights
    parts = []
    for module in module_path:  # ResNet
        if module.startswith("layer"):
            stage, block = module.split("_")
            parts += [stage, block]
        elif module == "downsample_conv":
            parts += ["downsample", "0"]
        elif module == "downsample_bn":
            parts += ["downsample", "1"]
        else:
            parts.append(module)
    return ".".join(parts)


def _final_layer(name: str) -> str:
    if name in VGG_CFGS:
        return "classifier.6"
    return "classifier.1" if name in SMALL_CNN_BATCHNORM else "fc"


def torch_key_layout(name: str, num_classes: int) -> dict[str, tuple[tuple[str, ...], str, tuple[int, ...]]]:
    """torch key -> (Flax variable path, conversion kind, expected torch shape) for backbone `name`.

    kind: "conv" (OIHW -> HWIO), "linear" ((out, in) -> (in, out)), "vgg_fc0" (linear with the
    (C, 7, 7) -> (7, 7, C) input permutation) or "vector".
    """
    model = build_model(name, num_classes, dropout_rate=0.0)
    dummy = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)  # shapes do not depend on image size
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), dummy)
    layout = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        keys = tuple(entry.key for entry in path)
        collection, module_path, leaf_name = keys[0], keys[1:-1], keys[-1]
        torch_key = f"{_torch_module(name, module_path)}.{_LEAF_TO_TORCH[(collection, leaf_name)]}"
        shape = tuple(leaf.shape)
        if len(shape) == 4:
            kind, torch_shape = "conv", (shape[3], shape[2], shape[0], shape[1])
        elif len(shape) == 2:
            is_vgg_fc0 = name in VGG_CFGS and module_path == ("fc_0",)
            kind, torch_shape = ("vgg_fc0" if is_vgg_fc0 else "linear"), (shape[1], shape[0])
        else:
            kind, torch_shape = "vector", shape
        layout[torch_key] = (keys, kind, torch_shape)
    return dict(sorted(layout.items(), key=lambda item: _torch_order(item[0])))


# torch's registration order of the names in our layouts, so that listings read like state_dict()
_TORCH_NAME_ORDER = {name: rank for rank, name in enumerate((
    "conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "downsample", "features",
    "layer1", "layer2", "layer3", "layer4", "classifier", "fc",
    "weight", "bias", "running_mean", "running_var"))}


def _torch_order(torch_key: str) -> tuple:
    return tuple((0, int(part)) if part.isdigit() else (1, _TORCH_NAME_ORDER[part]) for part in torch_key.split("."))


def _to_numpy(value: Any, key: str) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, read without importing torch
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"state_dict[{key!r}] has dtype {array.dtype}, expected a floating-point tensor")
    return array


def _to_flax_layout(array: np.ndarray, kind: str) -> np.ndarray:
    if kind == "conv":
        return array.transpose(2, 3, 1, 0)
    if kind == "linear":
        return array.T
    if kind == "vgg_fc0":
        out_features = array.shape[0]
        channels = array.shape[1] // (VGG_POOL_SIZE * VGG_POOL_SIZE)
        per_channel = array.reshape(out_features, channels, VGG_POOL_SIZE, VGG_POOL_SIZE)
        return per_channel.transpose(2, 3, 1, 0).reshape(-1, out_features)
    return array


def _set_path(tree: dict, keys: tuple[str, ...], value) -> None:
    for key in keys[:-1]:
        tree = tree.setdefault(key, {})
    tree[keys[-1]] = value


def _reinit_final_layer(kernel_shape, dtype, rng) -> tuple[jax.Array, jax.Array]:
    """torch's default nn.Linear init, in Flax layout: kernel (in, out) and bias ~ U(-1/sqrt(in), 1/sqrt(in))."""
    fan_in = kernel_shape[0]
    bound = 1.0 / math.sqrt(fan_in)
    kernel_key, bias_key = jax.random.split(rng)
    kernel = jax.random.uniform(kernel_key, kernel_shape, dtype, minval=-bound, maxval=bound)
    bias = jax.random.uniform(bias_key, kernel_shape[1:], dtype, minval=-bound, maxval=bound)
    return kernel, bias


def from_torchvision(name: str, state_dict: Mapping[str, Any], num_classes: int,
                     rng: jax.Array | None = None) -> dict:
    """Flax variables of `build_model(name, num_classes)` holding the weights of a torchvision `state_dict`.

    `state_dict` maps torchvision's keys to torch tensors or numpy arrays; dtypes are preserved
    (float64 stays float64 when jax_enable_x64 is on). If the state dict's final Linear has another
    number of outputs than `num_classes` (fine-tuning from ImageNet's 1000 classes), only that layer
    is re-initialized, with torch's default nn.Linear init drawn from `rng` (required then).

    Raises ValueError naming every missing key, unexpected key or shape mismatch.
    """
    layout = torch_key_layout(name, num_classes)  # raises ValueError on an unknown name
    final_weight, final_bias = f"{_final_layer(name)}.weight", f"{_final_layer(name)}.bias"

    # A final layer fitting everything but num_classes is re-initialized, not rejected.
    reinit_final = False
    if final_weight in state_dict and final_bias in state_dict:
        expected_weight_shape = layout[final_weight][2]
        weight_shape = tuple(np.shape(state_dict[final_weight]))
        bias_shape = tuple(np.shape(state_dict[final_bias]))
        reinit_final = (len(weight_shape) == 2 and weight_shape[1] == expected_weight_shape[1]
                        and weight_shape[0] != num_classes and bias_shape == weight_shape[:1])

    mismatched, missing, unexpected = [], [], []
    for key, (_, _, expected_shape) in layout.items():
        if key not in state_dict:
            missing.append(f"missing key {key!r} (expected shape {expected_shape})")
        elif not (reinit_final and key in (final_weight, final_bias)):
            found_shape = tuple(np.shape(state_dict[key]))
            if found_shape != expected_shape:
                mismatched.append(f"key {key!r}: expected shape {expected_shape}, found {found_shape}")
    for key in state_dict:
        if key not in layout and not str(key).endswith(_IGNORED_SUFFIXES):
            unexpected.append(f"unexpected key {key!r} (found shape {tuple(np.shape(state_dict[key]))})")
    problems = mismatched + missing + unexpected
    if problems:
        hint = ""
        if state_dict and all(str(k).startswith("module.") for k in state_dict):
            hint = " (keys start with 'module.': strip the DataParallel prefix first)"
        counts = (f"{len(mismatched)} shape mismatch(es), {len(missing)} missing key(s), "
                  f"{len(unexpected)} unexpected key(s)")
        listed = "; ".join(problems[:_MAX_LISTED_PROBLEMS])
        more = len(problems) - _MAX_LISTED_PROBLEMS
        raise ValueError(
            f"state_dict does not fit {name} with num_classes={num_classes}{hint}: {counts}: {listed}"
            + (f"; and {more} more" if more > 0 else ""))
    if reinit_final and rng is None:
        raise ValueError(
            f"state_dict's final layer {final_weight!r} has {np.shape(state_dict[final_weight])[0]} outputs "
            f"but num_classes={num_classes}: pass rng=jax.random.PRNGKey(...) to re-initialize it")

    variables: dict = {}
    for key, (flax_path, kind, _) in layout.items():
        if reinit_final and key in (final_weight, final_bias):
            continue
        array = _to_flax_layout(_to_numpy(state_dict[key], key), kind)
        _set_path(variables, flax_path, jnp.asarray(array))
    if reinit_final:
        kernel_path = layout[final_weight][0]
        in_features = layout[final_weight][2][1]
        dtype = jnp.asarray(_to_numpy(state_dict[final_weight], final_weight)[:0]).dtype
        kernel, bias = _reinit_final_layer((in_features, num_classes), dtype, rng)
        _set_path(variables, kernel_path, kernel)
        _set_path(variables, layout[final_bias][0], bias)
    return variables
