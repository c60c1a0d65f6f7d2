"""GAIN forward pass and losses with upstream (GAIN-pytorch) semantics; see docs/design.md.

Differences from upstream, all deliberate:
- per-label mode runs on any batch size (slots padded to `max_labels`) and every map uses the
  original image's features (upstream's forward hook is overwritten by the previous label's
  attention-mining forward);
- no hooks and no full backward: Grad-CAM gradients are taken w.r.t. the Grad-CAM layer only,
  so parameter `.grad` is never touched;
- the attention-mining forward freezes BatchNorm and (with grads_off) the parameters through
  `torch.func.functional_call` with detached tensors instead of toggling `requires_grad`.
"""
import dataclasses
import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from gain_torch_ref.models import split_model

# Upstream adds float64 machine epsilon to the min-max denominator (also in float32 runs).
MINMAX_EPS = sys.float_info.epsilon
MODES = ("union", "per_label")


@dataclasses.dataclass(frozen=True)
class RefConfig:
    """Same fields and defaults as gain_jax.GainConfig, minus cam_grad (the reference is "stop")."""
    mode: str = "union"
    sigma: float = 0.5
    omega: float = 10.0
    fill: float | Sequence[float] = 0.0
    grads_off: bool = False
    max_labels: int = 4
    cl_weight: float = 1.0
    am_weight: float = 1.0
    ex_weight: float = 0.0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"RefConfig.mode must be one of {MODES}, got {self.mode!r}")
        if self.max_labels < 1:
            raise ValueError(f"RefConfig.max_labels must be >= 1, got {self.max_labels}")
        if not isinstance(self.fill, (int, float)) and len(self.fill) != 3:
            raise ValueError(f"RefConfig.fill must be a float or 3 per-channel values, got {self.fill!r}")


def _fill_tensor(fill, like: torch.Tensor) -> torch.Tensor:
    """Fill value broadcastable against [N,3,H,W] images, in their dtype and device."""
    if isinstance(fill, (int, float)):
        return torch.tensor(float(fill), dtype=like.dtype, device=like.device)
    return torch.tensor([float(v) for v in fill], dtype=like.dtype, device=like.device).view(1, 3, 1, 1)


def _check_labels(labels, batch: int, num_classes: int, dtype, device) -> torch.Tensor:
    if labels is None:
        raise ValueError("labels are required when train=True (multi-hot [B, C])")
    labels = torch.as_tensor(labels, device=device).to(dtype)
    if labels.shape != (batch, num_classes):
        raise ValueError(f"labels must have shape {(batch, num_classes)} (multi-hot [B, C]), "
                         f"got {tuple(labels.shape)}")
    return labels


def _slots(selector: torch.Tensor, cfg: RefConfig, train: bool) -> torch.Tensor:
    """[B, K] int64 class per slot, -1 = padding (per_label) or no class (union)."""
    batch = selector.shape[0]
    positive = selector > 0
    if cfg.mode == "union":
        # The attended class when there is one; with several labels the first (ascending) one.
        first = torch.argmax(positive.to(torch.int64), dim=1)
        return torch.where(positive.any(dim=1), first, torch.full_like(first, -1)).view(batch, 1)
    counts = positive.sum(dim=1)
    if train and int(counts.max()) > cfg.max_labels:
        worst = int(torch.argmax(counts))
        raise ValueError(f"image {worst} has {int(counts[worst])} labels, more than "
                         f"max_labels={cfg.max_labels}; raise RefConfig.max_labels")
    slots = torch.full((batch, cfg.max_labels), -1, dtype=torch.int64, device=selector.device)
    for b in range(batch):
        classes = torch.nonzero(positive[b]).view(-1)  # ascending class order
        slots[b, :classes.numel()] = classes
    return slots


def _minmax(maps: torch.Tensor) -> torch.Tensor:
    """Per-map (over the last two axes) min-max scaling, upstream's eps in the denominator."""
    flat = maps.flatten(start_dim=-2)
    lo = flat.min(dim=-1).values[..., None, None]
    hi = flat.max(dim=-1).values[..., None, None]
    return (maps - lo) / (hi - lo + MINMAX_EPS)


def _attention_mining_logits(model: nn.Module, masked: torch.Tensor, grads_off: bool) -> torch.Tensor:
    """model(masked) with BatchNorm frozen (eval mode, no gradient to its affine parameters).

    Dropout keeps the mode the caller set. grads_off: every parameter is detached, so the loss
    reaches the weights only through the mask.
    """
    bn_layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    bn_param_ids = {id(p) for m in bn_layers for p in m.parameters(recurse=False)}
    params = {name: (p.detach() if grads_off or id(p) in bn_param_ids else p)
              for name, p in model.named_parameters()}
    for layer in bn_layers:
        layer.eval()
    return torch.func.functional_call(model, params, (masked,))


def gain_forward(model: nn.Module, images: torch.Tensor, labels: torch.Tensor | None,
                 cfg: RefConfig, train: bool = True) -> dict[str, torch.Tensor]:
    """Both GAIN streams on a batch; see the module docstring and docs/design.md steps 1-6.

    images [B,3,H,W]; labels [B,C] multi-hot (ignored, may be None, when train=False).
    Returns logits_cl [B,C], heatmap/scaled/mask [B,K,H,W], masked_images [B,K,3,H,W],
    logits_am [B,K,C], slot_labels [B,K] int64, selector [B,K,C] (the classes each slot attends
    to: the multi-hot labels in union training, one-hot of the argmax class in evaluation, one-hot
    of the slot's class in per_label mode; gain_losses scores and targets these). Padded per_label
    slots are zero everywhere.
    Every module's train/eval mode is restored on return.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
    saved_modes = [(m, m.training) for m in model.modules()]
    try:
        with torch.enable_grad():
            return _gain_forward(model, images, labels, cfg, train)
    finally:
        for module, mode in saved_modes:
            module.training = mode


def _gain_forward(model, images, labels, cfg, train):
    batch, _, height, width = images.shape
    feats_fn, head_fn = split_model(model)

    # 1. classification stream (updates BN running stats when train=True; nothing else does).
    model.train(train)
    feats = feats_fn(images)
    logits_cl = head_fn(feats)
    num_classes = logits_cl.shape[1]
    if train:
        selector = _check_labels(labels, batch, num_classes, images.dtype, images.device)
    else:
        selector = F.one_hot(torch.argmax(logits_cl.detach(), dim=1), num_classes).to(images.dtype)
    slot_labels = _slots(selector, cfg, train)
    num_slots = slot_labels.shape[1]

    # A frozen model still needs d logits / d feats for Grad-CAM.
    grad_target = feats if feats.requires_grad else feats.detach().requires_grad_()
    if grad_target is not feats:
        logits_for_grad = head_fn(grad_target)
    else:
        logits_for_grad = logits_cl

    # 2. Grad-CAM: weights are constants (upstream: hooks, no create_graph); feats keep their graph.
    def cam_for(weights_source: torch.Tensor, image_index):
        grads = torch.autograd.grad(weights_source, grad_target, retain_graph=True)[0]
        weights = grads[image_index].mean(dim=(-2, -1), keepdim=True).detach()
        return F.relu((weights * feats[image_index]).sum(dim=-3))

    if cfg.mode == "union":
        cams = cam_for((selector * logits_for_grad).sum(), slice(None))  # [B,h,w]
        flat_index = torch.arange(batch, device=images.device)
        source_image = flat_index
    else:
        cam_list, flat_list, image_list = [], [], []
        for b in range(batch):
            for k in range(num_slots):
                cls = int(slot_labels[b, k])
                if cls < 0:
                    continue
                cam_list.append(cam_for(logits_for_grad[b, cls], b))
                flat_list.append(b * num_slots + k)
                image_list.append(b)
        cams = torch.stack(cam_list)  # [N,h,w], N = number of valid slots
        flat_index = torch.tensor(flat_list, dtype=torch.int64, device=images.device)
        source_image = torch.tensor(image_list, dtype=torch.int64, device=images.device)

    # 3-5. upsample (align_corners=True = upstream's F.upsample_bilinear), min-max, soft mask.
    heatmap = F.interpolate(cams[:, None], size=(height, width), mode="bilinear", align_corners=True)[:, 0]
    scaled = _minmax(heatmap)
    mask = torch.sigmoid(cfg.omega * (scaled - cfg.sigma))
    originals = images[source_image]
    mask_c = mask[:, None]
    masked = originals - originals * mask_c + mask_c * _fill_tensor(cfg.fill, images)

    # 6. attention-mining stream on every masked image at once (BN frozen: no cross-sample coupling).
    logits_am = _attention_mining_logits(model, masked, cfg.grads_off)

    def scatter(values):
        """[N, ...] valid-slot values -> [B, K, ...] with zeros in padded slots (differentiable)."""
        full = values.new_zeros((batch * num_slots,) + tuple(values.shape[1:]))
        return full.index_copy(0, flat_index, values).view((batch, num_slots) + tuple(values.shape[1:]))

    if cfg.mode == "union":
        slot_selector = selector[:, None]
    else:
        slot_selector = F.one_hot(slot_labels.clamp(min=0), num_classes).to(images.dtype)
        slot_selector = slot_selector * (slot_labels >= 0)[..., None]

    return {
        "logits_cl": logits_cl,
        "heatmap": scatter(heatmap),
        "scaled": scatter(scaled),
        "mask": scatter(mask),
        "masked_images": scatter(masked),
        "logits_am": scatter(logits_am),
        "slot_labels": slot_labels,
        "selector": slot_selector.detach(),
    }


def _ex_targets(slot_labels, attended, gt_masks, mode):
    """[B,K,H,W] 0/1 target of each map from VOC-encoded gt masks (0 bg, c+1 class c, 255 ignore).

    attended [B,C]: the classes the union-mode map attends to (unused in per_label mode).
    """
    num_classes = attended.shape[1]
    gt = gt_masks.to(torch.int64)
    if mode == "union":
        cls = gt - 1
        in_range = (cls >= 0) & (cls < num_classes)
        positive = attended > 0
        hit = torch.stack([positive[b][cls[b].clamp(0, num_classes - 1)] for b in range(gt.shape[0])])
        return (hit & in_range)[:, None]
    valid = slot_labels >= 0
    return (gt[:, None] == (slot_labels + 1)[:, :, None, None]) & valid[:, :, None, None]


def gain_losses(out: dict[str, torch.Tensor], labels: torch.Tensor, cfg: RefConfig,
                gt_masks: torch.Tensor | None = None,
                has_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """cl, am, ex, total (0-dim, differentiable); docs/design.md step 7.

    Union mode scores (am) and targets (ex) the classes the map attended to, out["selector"]:
    the labels in training, the argmax class in evaluation (whose masked image logits_am scores);
    an output without "selector" falls back to the labels. An image without attended classes
    contributes 0 to am (its class count is clamped to 1); ex averages over images with has_mask
    (all images when has_mask is None) and is 0 when there are none.
    """
    logits_cl, logits_am, slot_labels = out["logits_cl"], out["logits_am"], out["slot_labels"]
    labels = _check_labels(labels, logits_cl.shape[0], logits_cl.shape[1], logits_cl.dtype, logits_cl.device)
    cl = F.binary_cross_entropy_with_logits(logits_cl, labels)
    attended = out["selector"][:, 0].to(labels.dtype) if "selector" in out else labels

    probs = torch.softmax(logits_am, dim=-1)
    if cfg.mode == "union":
        per_image = (probs[:, 0] * attended).sum(dim=1) / attended.sum(dim=1).clamp(min=1)
        slot_valid = torch.ones_like(slot_labels, dtype=torch.bool)
    else:
        slot_valid = slot_labels >= 0
        picked = probs.gather(-1, slot_labels.clamp(min=0)[..., None])[..., 0]
        per_image = (picked * slot_valid).sum(dim=1) / slot_valid.sum(dim=1).clamp(min=1)
    am = per_image.mean()

    scaled = out["scaled"]
    if gt_masks is None:
        ex = scaled.sum() * 0.0
    else:
        gt_masks = torch.as_tensor(gt_masks, device=scaled.device)
        expected = (scaled.shape[0],) + tuple(scaled.shape[2:])
        if tuple(gt_masks.shape) != expected:
            raise ValueError(f"gt_masks must have shape {expected} ([B,H,W]), got {tuple(gt_masks.shape)}")
        if has_mask is None:
            has_mask = torch.ones(scaled.shape[0], dtype=torch.bool, device=scaled.device)
        has_mask = torch.as_tensor(has_mask, device=scaled.device).to(torch.bool).view(-1)
        target = _ex_targets(slot_labels, attended, gt_masks, cfg.mode).to(scaled.dtype)
        counted = (gt_masks != 255)[:, None].to(scaled.dtype)
        per_map = (((scaled - target) ** 2) * counted).sum(dim=(-2, -1)) / counted.sum(dim=(-2, -1)).clamp(min=1)
        per_image_ex = (per_map * slot_valid).sum(dim=1) / slot_valid.sum(dim=1).clamp(min=1)
        weight = has_mask.to(scaled.dtype)
        ex = (per_image_ex * weight).sum() / weight.sum().clamp(min=1)

    total = cfg.cl_weight * cl + cfg.am_weight * am + cfg.ex_weight * ex
    return {"cl": cl, "am": am, "ex": ex, "total": total}


def upstream_per_label_total(losses: dict[str, torch.Tensor], n_labels) -> torch.Tensor:
    """Upstream's batch-1 per-label script: n_labels * L_cl + L_am."""
    return n_labels * losses["cl"] + losses["am"]
