"""Runs one GAIN configuration through gain_torch_ref and gain_jax on identical weights and inputs.

The torch model is the source of truth for the weights: `from_torchvision` imports them into the flax
tree and, being a linear re-layout, imports the torch gradients and stepped parameters too, so every
comparison happens in one layout. Images are drawn in NCHW and transposed to NHWC for JAX; torch's
[B,K,3,H,W] masked images are permuted to JAX's [B,K,H,W,3].

"Relative" difference everywhere: max|jax - torch| / max|torch|, over one tensor (each gradient and
parameter leaf on its own). Each test attaches what it measured to its report (`record`), and
parity_tests/conftest.py prints the largest figures per quantity and precision at the end.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from flax import traverse_util

import gain_jax as gj
import gain_torch_ref as ref
from gain_jax.convert import from_torchvision

NUM_CLASSES = 6
# ImageNet-normalized black, one value per channel: a per-channel fill of the masked region.
NORMALIZED_BLACK = (-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225)
ADAM = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8)
ADAM_STEPS = 3
USER_PROPERTY = "parity"  # key of the measured differences in each test report's user_properties

# float64: an exact re-implementation agrees to ~1e-14 (docs/design.md, section 3); 1e-9 leaves room for summation order
# in long reductions (VGG's 25088-wide classifier) and nothing for a semantic difference.
FLOAT64_TOL = 1e-9
# float32 forward quantities and losses: the measured worst is printed by the suite (docs/design.md, section 3).
FLOAT32_TOL = 1e-5

# The change Adam makes to a parameter, lr * m / (sqrt(v) + eps), is ill-conditioned where a gradient entry
# is near or below eps = 1e-8: there it is lr * g / eps, so the gradient's absolute float64 roundoff
# (~1e-16; e.g. small_cnn's conv biases before train-mode BatchNorm, whose classification-stream gradient
# cancels exactly and leaves only roundoff, plus the attention-mining part) is amplified by 1 / eps, while
# the largest change is ~lr per step. Measured: 1.25e-8 of the largest change (small_cnn, conv_1/bias; lr
# 1e-4). The parameters after the steps, the figure upstream cares about, are held to FLOAT64_TOL.
ADAM_CHANGE_TOL = 1e-7

FORWARD_QUANTITIES = ("logits_cl", "heatmap", "scaled", "mask", "masked_images", "logits_am")
LOSS_TERMS = ("cl", "am", "ex", "total")


@dataclasses.dataclass(frozen=True)
class Case:
    """One GAIN configuration. `label_sets`: the positive classes of each image (batch = its length)."""

    model: str
    size: tuple[int, int]
    label_sets: tuple[tuple[int, ...], ...]
    mode: str = "union"
    train: bool = True
    grads_off: bool = False
    fill: Any = 0.0
    ex: bool = False  # ground-truth masks (with 255 pixels) in the loss; has_mask False for image 1 of 3
    weights: tuple[float, float, float] = (1.0, 1.0, 1.0)  # cl, am, ex
    max_labels: int = 4
    upstream_total: bool = False  # per-label batch 1: upstream's n_labels * L_cl + L_am (+ ex_weight * L_e)
    dropout: float = 0.0  # only with train=False (dropout is random in training)
    seed: int = 0

    def __post_init__(self):
        if self.dropout and self.train:
            raise ValueError(f"{self.id}: dropout draws differ between frameworks; use it with train=False")
        if self.upstream_total and (self.mode != "per_label" or self.batch != 1):
            raise ValueError(f"{self.id}: upstream's total is per-label with batch 1")

    @property
    def batch(self) -> int:
        return len(self.label_sets)

    @property
    def id(self) -> str:
        h, w = self.size
        parts = [self.model, f"{h}x{w}", f"b{self.batch}", self.mode, "train" if self.train else "eval"]
        flags = {"grads_off": self.grads_off, "fill": self.fill != 0.0, "ex": self.ex,
                 "upstream_total": self.upstream_total, f"dropout{self.dropout}": self.dropout > 0}
        return "-".join(parts + [name for name, on in flags.items() if on])

    def cl_weight(self) -> float:
        return float(len(self.label_sets[0])) if self.upstream_total else self.weights[0]

    def ref_config(self) -> ref.RefConfig:
        return ref.RefConfig(mode=self.mode, fill=self.fill, grads_off=self.grads_off, max_labels=self.max_labels,
                             cl_weight=self.cl_weight(), am_weight=self.weights[1], ex_weight=self.weights[2])

    def jax_config(self) -> gj.GainConfig:
        return gj.GainConfig(mode=self.mode, fill=self.fill, cam_grad="stop", grads_off=self.grads_off,
                             max_labels=self.max_labels, cl_weight=self.cl_weight(), am_weight=self.weights[1],
                             ex_weight=self.weights[2])


# ----------------------------------------------------------------------------------------- models

def torch_model(name: str, seed: int = 0) -> torch.nn.Module:
    """A float64 torchvision-layout model; BatchNorm gets random affine parameters and running statistics,
    so that evaluation-mode BN and the attention-mining stream's frozen BN are far from the identity."""
    torch.manual_seed(seed)
    model = ref.build_model(name, NUM_CLASSES, dropout=0.0).double()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(0.5 + torch.rand(n, generator=gen, dtype=torch.float64))
                module.bias.copy_(0.1 * torch.randn(n, generator=gen, dtype=torch.float64))
                module.running_mean.copy_(0.1 * torch.randn(n, generator=gen, dtype=torch.float64))
                module.running_var.copy_(0.5 + torch.rand(n, generator=gen, dtype=torch.float64))
    return model


def _float_state(model: torch.nn.Module) -> dict:
    return {k: v for k, v in model.state_dict().items() if v.is_floating_point()}


def to_flax(name: str, model: torch.nn.Module, parameters: dict | None = None) -> dict:
    """flax variables of `model`'s state (BN statistics included); `parameters` replaces its parameters.

    The conversion is linear, so `parameters` may hold gradients: their "params" tree is then the
    gradient in flax layout, and the "batch_stats" that came along are not gradients (drop them).
    """
    state = _float_state(model)
    if parameters is not None:
        state.update(parameters)
    return from_torchvision(name, state, NUM_CLASSES)


class ModelPair:
    """A torch model in float64 and float32 and its flax import in the same dtypes (lazily, once each).

    The torch models keep their pristine state across cases: `run_torch` restores BN statistics and
    clears gradients after each run.
    """

    def __init__(self, name: str, seed: int = 0):
        self.name = name
        self.torch = {"float64": torch_model(name, seed)}
        self._flax: dict[str, dict] = {}

    def torch_model(self, precision: str) -> torch.nn.Module:
        if precision not in self.torch:
            self.torch[precision] = torch_model_copy(self.torch["float64"], torch.float32)
        return self.torch[precision]

    def flax_variables(self, precision: str) -> dict:
        """Call inside `jax.enable_x64(precision == "float64")`, like everything else of that precision.

        One precision is held at a time (VGG's weights are 1.1 GB in float64): the test modules run
        their float64 tests first.
        """
        if precision not in self._flax:
            self._flax = {precision: to_flax(self.name, self.torch_model(precision))}
        return self._flax[precision]

    @property
    def has_batch_norm(self) -> bool:
        return any(isinstance(m, torch.nn.BatchNorm2d) for m in self.torch["float64"].modules())


def torch_model_copy(model: torch.nn.Module, dtype) -> torch.nn.Module:
    import copy
    return copy.deepcopy(model).to(dtype)


def jax_model(case: Case):
    return gj.build_model(case.model, NUM_CLASSES, dropout_rate=case.dropout)


# ----------------------------------------------------------------------------------------- inputs

@dataclasses.dataclass
class Inputs:
    images: torch.Tensor  # [B,3,H,W] float64
    labels: torch.Tensor  # [B,C] float64 multi-hot
    gt_masks: torch.Tensor | None  # [B,H,W] int64, VOC encoding
    has_mask: torch.Tensor | None  # [B] bool

    def to(self, dtype) -> Inputs:
        return dataclasses.replace(self, images=self.images.to(dtype), labels=self.labels.to(dtype))

    def jax_batch(self, dtype) -> dict:
        batch = {"image": jnp.asarray(self.images.permute(0, 2, 3, 1).numpy(), dtype),
                 "labels": jnp.asarray(self.labels.numpy(), dtype)}
        if self.gt_masks is not None:
            batch["mask"] = jnp.asarray(self.gt_masks.numpy())
            batch["has_mask"] = jnp.asarray(self.has_mask.numpy())
        return batch


def make_inputs(case: Case) -> Inputs:
    gen = torch.Generator().manual_seed(100 + case.seed)
    height, width = case.size
    images = torch.randn(case.batch, 3, height, width, generator=gen, dtype=torch.float64)
    labels = torch.zeros(case.batch, NUM_CLASSES, dtype=torch.float64)
    for index, classes in enumerate(case.label_sets):
        labels[index, list(classes)] = 1.0
    gt_masks = has_mask = None
    if case.ex:
        # 4x4-pixel blocks of background, of every class (labelled or not) and of 255 (ignored)
        codes = torch.tensor(list(range(NUM_CLASSES + 1)) + [255])
        coarse = codes[torch.randint(len(codes), (case.batch, (height + 3) // 4, (width + 3) // 4), generator=gen)]
        gt_masks = coarse.repeat_interleave(4, 1).repeat_interleave(4, 2)[:, :height, :width].contiguous()
        has_mask = torch.ones(case.batch, dtype=torch.bool)
        if case.batch > 1:
            has_mask[1] = False
    return Inputs(images, labels, gt_masks, has_mask)


# ----------------------------------------------------------------------------------------- runs

def _set_dropout(model: torch.nn.Module, p: float) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p


def run_torch(pair: ModelPair, case: Case, inputs: Inputs, precision: str, with_grads: bool) -> dict:
    """gain_torch_ref's forward, losses, BN statistics after the forward and (optionally) gradients of the
    total, all as numpy in gain_jax's layouts; the model's state is restored afterwards."""
    model = pair.torch_model(precision)
    pristine_buffers = {name: b.clone() for name, b in model.named_buffers()}
    cfg = case.ref_config()
    try:
        _set_dropout(model, case.dropout)
        model.zero_grad(set_to_none=True)
        out = ref.gain_forward(model, inputs.images, inputs.labels, cfg, train=case.train)
        losses = ref.gain_losses(out, inputs.labels, cfg, gt_masks=inputs.gt_masks, has_mask=inputs.has_mask)
        if case.upstream_total:
            losses["total"] = (ref.upstream_per_label_total(losses, len(case.label_sets[0]))
                               + cfg.ex_weight * losses["ex"])
        if with_grads:
            losses["total"].backward()
        result = {name: out[name].detach().numpy() for name in FORWARD_QUANTITIES + ("slot_labels", "selector")}
        result["masked_images"] = result["masked_images"].transpose(0, 1, 3, 4, 2)
        result.update({f"loss_{k}": v.detach().numpy() for k, v in losses.items()})
        result["batch_stats"] = to_flax(case.model, model)["batch_stats"] if pair.has_batch_norm else {}
        if with_grads:
            grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)).detach()
                     for n, p in model.named_parameters()}
            result["grads"] = to_flax(case.model, model, grads)["params"]
        return result
    finally:
        _set_dropout(model, 0.0)
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                buffer.copy_(pristine_buffers[name])


def run_jax(pair: ModelPair, case: Case, inputs: Inputs, precision: str, with_grads: bool) -> dict:
    """gain_jax's forward, losses, BN statistics and (optionally) gradients of the total w.r.t. "params",
    as numpy; one jit-compiled program."""
    model = jax_model(case)
    cfg = case.jax_config()
    variables = pair.flax_variables(precision)
    batch = inputs.jax_batch(jnp.float64 if precision == "float64" else jnp.float32)
    others = {k: v for k, v in variables.items() if k != "params"}

    def total_loss(params, batch):
        out = gj.gain_forward(model, {"params": params, **others}, batch["image"], batch["labels"], cfg,
                              train=case.train)
        losses = gj.gain_losses(out, batch["labels"], cfg, gt_masks=batch.get("mask"),
                                has_mask=batch.get("has_mask"))
        return losses["total"], (out, losses)

    if with_grads:
        (_, (out, losses)), grads = jax.jit(jax.value_and_grad(total_loss, has_aux=True))(variables["params"], batch)
    else:
        _, (out, losses) = jax.jit(total_loss)(variables["params"], batch)
    result = {name: np.asarray(getattr(out, name)) for name in FORWARD_QUANTITIES + ("slot_labels", "selector")}
    result.update({f"loss_{k}": np.asarray(v) for k, v in losses.items()})
    # evaluation (and models without BN) leave the statistics as they were
    result["batch_stats"] = jax.tree_util.tree_map(
        np.asarray, out.model_state.get("batch_stats", variables.get("batch_stats", {})))
    if with_grads:
        result["grads"] = jax.tree_util.tree_map(np.asarray, grads)
    return result


def adam_torch(pair: ModelPair, case: Case, inputs: Inputs) -> dict:
    """ADAM_STEPS torch.optim.Adam steps on gain_torch_ref's total (float64, on a copy of the model);
    returns the stepped variables in flax layout."""
    model = torch_model_copy(pair.torch_model("float64"), torch.float64)
    cfg = case.ref_config()
    optimizer = torch.optim.Adam(model.parameters(), **ADAM)
    for _ in range(ADAM_STEPS):
        optimizer.zero_grad(set_to_none=True)
        out = ref.gain_forward(model, inputs.images, inputs.labels, cfg, train=True)
        losses = ref.gain_losses(out, inputs.labels, cfg, gt_masks=inputs.gt_masks, has_mask=inputs.has_mask)
        losses["total"].backward()
        optimizer.step()
    return to_flax(case.model, model)


def adam_jax(pair: ModelPair, case: Case, inputs: Inputs) -> dict:
    """ADAM_STEPS of gain_jax's own jit-compiled train step with optax.adam (float64); the stepped variables."""
    tx = optax.adam(ADAM["lr"], b1=ADAM["betas"][0], b2=ADAM["betas"][1], eps=ADAM["eps"])
    state = gj.create_train_state(pair.flax_variables("float64"), tx)
    train_step = gj.make_train_step(jax_model(case), case.jax_config(), donate=False)
    batch = inputs.jax_batch(jnp.float64)
    for step in range(ADAM_STEPS):
        state, _ = train_step(state, batch, jax.random.PRNGKey(step), 1)
    stepped = {"params": state.params}
    if state.batch_stats:
        stepped["batch_stats"] = state.batch_stats
    return jax.tree_util.tree_map(np.asarray, stepped)


# ----------------------------------------------------------------------------------------- comparison

@dataclasses.dataclass
class Difference:
    quantity: str
    abs_diff: float
    rel_diff: float  # abs_diff / largest |torch entry| (abs_diff itself when the torch tensor is all zero)
    tolerance: float

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.rel_diff)) and self.rel_diff <= self.tolerance


def _largest(value) -> float:
    value = np.asarray(value, dtype=np.float64)
    return float(np.max(np.abs(value))) if value.size else 0.0


def difference(quantity: str, jax_value, torch_value, tolerance: float, scale: float | None = None) -> Difference:
    """`scale` (default: the torch tensor's largest entry) is what the difference is relative to."""
    jax_value = np.asarray(jax_value, dtype=np.float64)
    torch_value = np.asarray(torch_value, dtype=np.float64)
    if jax_value.shape != torch_value.shape:
        return Difference(f"{quantity} (shape {jax_value.shape} vs {torch_value.shape})", np.inf, np.inf, tolerance)
    if jax_value.size == 0:
        return Difference(quantity, 0.0, 0.0, tolerance)
    gap = np.atleast_1d(np.subtract(jax_value, torch_value))  # in place: VGG's gradients have 100M entries
    abs_diff = float(np.max(np.abs(gap, out=gap)))
    scale = _largest(torch_value) if scale is None else scale
    return Difference(quantity, abs_diff, abs_diff / scale if scale > 0 else abs_diff, tolerance)


# A leaf this many times smaller than the tree's largest entry is zero in exact arithmetic: the gradient
# of a conv bias followed by train-mode BatchNorm (BN subtracts the batch mean) is roundoff (~1e-17) on
# both sides, and relative to itself that noise reads ~100%. Such a leaf is measured against the tree's
# largest entry instead.
ZERO_LEAF_RATIO = 1e-12


def tree_difference(quantity: str, jax_tree, torch_tree, tolerance: float) -> list[Difference]:
    """One Difference per leaf, each relative to its own largest entry, named quantity:path."""
    jax_flat = traverse_util.flatten_dict(jax_tree, sep="/") if jax_tree else {}
    torch_flat = traverse_util.flatten_dict(torch_tree, sep="/") if torch_tree else {}
    if set(jax_flat) != set(torch_flat):
        mismatched = sorted(set(jax_flat) ^ set(torch_flat))
        return [Difference(f"{quantity} (leaves differ: {mismatched[:4]})", np.inf, np.inf, tolerance)]
    tree_scale = max((_largest(leaf) for leaf in torch_flat.values()), default=0.0)
    diffs = []
    for path in sorted(jax_flat):
        scale = _largest(torch_flat[path])
        if scale <= ZERO_LEAF_RATIO * tree_scale:
            scale = tree_scale
        diffs.append(difference(f"{quantity}:{path}", jax_flat[path], torch_flat[path], tolerance, scale))
    return diffs


def valid_slots(result: dict) -> np.ndarray:
    return result["slot_labels"] >= 0


def forward_differences(jax_result: dict, torch_result: dict, tolerance: float) -> list[Difference]:
    """Forward quantities on the valid slots (torch leaves padded slots zero), loss terms, BN statistics."""
    valid = valid_slots(torch_result)
    diffs = [difference("logits_cl", jax_result["logits_cl"], torch_result["logits_cl"], tolerance)]
    for name in FORWARD_QUANTITIES[1:]:
        diffs.append(difference(name, jax_result[name][valid], torch_result[name][valid], tolerance))
    for term in LOSS_TERMS:
        diffs.append(difference(f"loss_{term}", jax_result[f"loss_{term}"], torch_result[f"loss_{term}"],
                                tolerance))
    diffs += tree_difference("batch_stats", jax_result["batch_stats"], torch_result["batch_stats"], tolerance)
    return diffs


def check_same_slots(jax_result: dict, torch_result: dict) -> None:
    """Which classes each slot attends to must agree exactly, else no other comparison means anything."""
    np.testing.assert_array_equal(jax_result["slot_labels"] >= 0, valid_slots(torch_result))
    valid = valid_slots(torch_result)
    np.testing.assert_array_equal(jax_result["slot_labels"][valid], torch_result["slot_labels"][valid])
    np.testing.assert_array_equal(jax_result["selector"], torch_result["selector"])


def check_informative(torch_result: dict, case: Case) -> None:
    """A case whose maps are all flat tests little of Grad-CAM: fail loudly rather than pass vacuously."""
    heatmap = torch_result["heatmap"][valid_slots(torch_result)]
    ranges = heatmap.max(axis=(-2, -1)) - heatmap.min(axis=(-2, -1))
    assert (ranges > 0).all(), f"{case.id}: a Grad-CAM map is flat (ranges {ranges}); pick another seed or size"


def record(request, precision: str, differences: Sequence[Difference]) -> None:
    """Attach the measured differences to the test report (JSON strings, so pytest-xdist carries them);
    leaves of a tree are summarized under the tree's name (grads:conv_0/kernel -> grads)."""
    for d in differences:
        quantity = d.quantity.split(":", 1)[0]
        request.node.user_properties.append(
            (USER_PROPERTY, json.dumps([precision, quantity, d.abs_diff, d.rel_diff, d.tolerance])))


def assert_close(differences: Sequence[Difference], context: str) -> None:
    failed = [d for d in differences if not d.ok]
    if failed:
        lines = [f"  {d.quantity}: max abs {d.abs_diff:.3e}, rel {d.rel_diff:.3e} > tol {d.tolerance:.0e}"
                 for d in failed]
        raise AssertionError(f"{context}: {len(failed)} of {len(differences)} comparisons out of tolerance\n"
                             + "\n".join(lines))


# ----------------------------------------------------------------------------------------- the checks

def check_float64(pair: ModelPair, case: Case, request) -> None:
    """Everything in float64: forward quantities, losses, BN statistics and every parameter's gradient."""
    inputs = make_inputs(case)
    with jax.enable_x64(True):
        torch_result = run_torch(pair, case, inputs, "float64", with_grads=True)
        jax_result = run_jax(pair, case, inputs, "float64", with_grads=True)
    check_same_slots(jax_result, torch_result)
    check_informative(torch_result, case)
    diffs = forward_differences(jax_result, torch_result, FLOAT64_TOL)
    diffs += tree_difference("grads", jax_result["grads"], torch_result["grads"], FLOAT64_TOL)
    record(request, "float64", diffs)
    assert_close(diffs, f"{case.id} float64")


def check_float32(pair: ModelPair, case: Case, request, tolerance: float = FLOAT32_TOL) -> None:
    """Forward quantities, losses and BN statistics in float32 (gradients are ill-conditioned there)."""
    inputs = make_inputs(case).to(torch.float32)
    with jax.enable_x64(False):
        torch_result = run_torch(pair, case, inputs, "float32", with_grads=False)
        jax_result = run_jax(pair, case, inputs, "float32", with_grads=False)
    check_same_slots(jax_result, torch_result)
    diffs = forward_differences(jax_result, torch_result, tolerance)
    record(request, "float32", diffs)
    assert_close(diffs, f"{case.id} float32")


def check_adam(pair: ModelPair, case: Case, request) -> None:
    """Parameters and BN statistics after ADAM_STEPS Adam steps (float64), and the parameter change itself
    (params after - params before), which is what the optimizer computed."""
    inputs = make_inputs(case)
    with jax.enable_x64(True):
        before = jax.tree_util.tree_map(np.asarray, pair.flax_variables("float64"))
        torch_after = adam_torch(pair, case, inputs)
        jax_after = adam_jax(pair, case, inputs)
    diffs = tree_difference("adam_params", jax_after["params"], torch_after["params"], FLOAT64_TOL)
    changes = [jax.tree_util.tree_map(np.subtract, after["params"], before["params"])
               for after in (jax_after, torch_after)]
    diffs += tree_difference("adam_param_change", *changes, ADAM_CHANGE_TOL)
    diffs += tree_difference("adam_batch_stats", jax_after.get("batch_stats"), torch_after.get("batch_stats"),
                             FLOAT64_TOL)
    record(request, "float64", diffs)
    assert_close(diffs, f"{case.id} Adam x{ADAM_STEPS}")
