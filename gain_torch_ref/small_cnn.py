"""`small_cnn` in torchvision's style: the PyTorch twin of `gain_jax.models.SmallCNN`.

The layout (module indices inside `features`, `classifier`) is the contract that
`gain_jax.from_torchvision("small_cnn", state_dict)` relies on:

    features.0  Conv2d(3, 16, 3, padding=1)     features.1  BatchNorm2d(16)   2 ReLU  3 MaxPool2d(2)
    features.4  Conv2d(16, 32, 3, padding=1)    features.5  BatchNorm2d(32)   6 ReLU  7 MaxPool2d(2)
    features.8  Conv2d(32, 64, 3, padding=1)    features.9  BatchNorm2d(64)  10 ReLU 11 MaxPool2d(2)
    features.12 Conv2d(64, 128, 3, padding=1)   features.13 BatchNorm2d(128) 14 ReLU
    avgpool     AdaptiveAvgPool2d(1)  (the head starts here: Grad-CAM layer = `features` output)
    classifier.0 Dropout(p)   classifier.1 Linear(128, num_classes)

With batchnorm=False (`from_torchvision("small_cnn_nobn", ...)`) there is no BatchNorm2d and the
indices inside `features` shift; `avgpool` and `classifier` are unchanged:

    features.0  Conv2d(3, 16, 3, padding=1)     1 ReLU   2 MaxPool2d(2)
    features.3  Conv2d(16, 32, 3, padding=1)    4 ReLU   5 MaxPool2d(2)
    features.6  Conv2d(32, 64, 3, padding=1)    7 ReLU   8 MaxPool2d(2)
    features.9  Conv2d(64, 128, 3, padding=1)  10 ReLU

At 64x64 input the Grad-CAM layer is 8x8x128.
"""
import torch
from torch import nn

WIDTHS = (16, 32, 64, 128)


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int = 6, dropout: float = 0.0, batchnorm: bool = True):
        super().__init__()
        layers = []
        in_ch = 3
        for i, width in enumerate(WIDTHS):
            layers.append(nn.Conv2d(in_ch, width, 3, padding=1))
            if batchnorm:
                layers.append(nn.BatchNorm2d(width))
            layers.append(nn.ReLU(inplace=False))
            if i < len(WIDTHS) - 1:
                layers.append(nn.MaxPool2d(2))
            in_ch = width
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(in_ch, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(feats), 1))


def small_cnn(num_classes: int = 6, dropout: float = 0.0, batchnorm: bool = True) -> SmallCNN:
    return SmallCNN(num_classes=num_classes, dropout=dropout, batchnorm=batchnorm)
