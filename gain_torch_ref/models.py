"""Classifiers for the reference, and their split at the Grad-CAM layer.

`build_model` returns torchvision's architectures (random init, no downloads) with the final
Linear replaced by one with `num_classes` outputs, as upstream does before fine-tuning.
`split_model` cuts a model at the Grad-CAM layer: `head_fn(feats_fn(x)) == model(x)`.
"""
from collections.abc import Callable

import torch
import torchvision
from torch import nn

from gain_torch_ref.small_cnn import SmallCNN

MODEL_NAMES = ("vgg16", "vgg19", "resnet18", "resnet50", "small_cnn", "small_cnn_nobn")


def build_model(name: str, num_classes: int, dropout: float = 0.0) -> nn.Module:
    """A freshly initialised classifier; `dropout` is the p of VGG's and small_cnn's Dropout layers."""
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model name {name!r}; expected one of {MODEL_NAMES}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if name in ("small_cnn", "small_cnn_nobn"):
        return SmallCNN(num_classes=num_classes, dropout=dropout, batchnorm=name == "small_cnn")
    constructor = getattr(torchvision.models, name)
    if name.startswith("vgg"):
        model = constructor(weights=None, dropout=dropout)
        last = model.classifier[-1]
        model.classifier[-1] = nn.Linear(last.in_features, num_classes)
    else:
        model = constructor(weights=None)
        model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


def split_model(model: nn.Module) -> tuple[Callable[[torch.Tensor], torch.Tensor],
                                           Callable[[torch.Tensor], torch.Tensor]]:
    """(feats_fn, head_fn): features up to the Grad-CAM layer, and the rest of the network.

    VGG / small_cnn: the Grad-CAM layer is the output of `features` (after VGG's last max-pool);
    ResNet: the output of `layer4`. The functions call the model's own submodules, so they see
    its current train/eval mode and parameters.
    """
    if isinstance(model, (torchvision.models.VGG, SmallCNN)):
        def feats_fn(x):
            return model.features(x)

        def head_fn(feats):
            return model.classifier(torch.flatten(model.avgpool(feats), 1))

        return feats_fn, head_fn
    if isinstance(model, torchvision.models.ResNet):
        def feats_fn(x):
            x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
            return model.layer4(model.layer3(model.layer2(model.layer1(x))))

        def head_fn(feats):
            return model.fc(torch.flatten(model.avgpool(feats), 1))

        return feats_fn, head_fn
    raise ValueError(f"split_model: unsupported model type {type(model).__name__}; "
                     "expected torchvision VGG, ResNet or gain_torch_ref SmallCNN")
