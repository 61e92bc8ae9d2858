"""A DenseNet-121 in torchvision's (and TorchXRayVision's) module layout, written out here.

It stands in for a TorchXRayVision checkpoint's source module: same architecture,
different parameter names, so importing its state dict exercises the renames and the
outputs can be compared with an implementation that is not MONAI's.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torch.nn import functional


class _DenseLayer(nn.Module):
    def __init__(self, channels: int, growth: int = 32, bottleneck: int = 4) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(channels, bottleneck * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bottleneck * growth)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(bottleneck * growth, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        new = self.conv2(self.relu2(self.norm2(self.conv1(self.relu1(self.norm1(x))))))
        return torch.cat([x, new], 1)


class TorchvisionDenseNet121(nn.Module):
    def __init__(self, in_channels: int = 1, classes: int = 18) -> None:
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict(
            conv0=nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False),
            norm0=nn.BatchNorm2d(64),
            relu0=nn.ReLU(),
            pool0=nn.MaxPool2d(3, stride=2, padding=1),
        )
        channels = 64
        for b, count in enumerate((6, 12, 24, 16), start=1):
            block = nn.Sequential()
            for i in range(count):
                block.add_module(f"denselayer{i + 1}", _DenseLayer(channels + i * 32))
            layers[f"denseblock{b}"] = block
            channels += count * 32
            if b != 4:
                layers[f"transition{b}"] = nn.Sequential(
                    OrderedDict(
                        norm=nn.BatchNorm2d(channels),
                        relu=nn.ReLU(),
                        conv=nn.Conv2d(channels, channels // 2, 1, bias=False),
                        pool=nn.AvgPool2d(2, stride=2),
                    )
                )
                channels //= 2
        layers["norm5"] = nn.BatchNorm2d(channels)
        self.features = nn.Sequential(layers)
        self.classifier = nn.Linear(channels, classes)
        self.register_buffer("op_threshs", torch.linspace(0.2, 0.7, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = functional.relu(self.features(x))
        pooled = functional.adaptive_avg_pool2d(features, 1).flatten(1)
        return torch.sigmoid(self.classifier(pooled))


def seeded(seed: int = 5) -> TorchvisionDenseNet121:
    """Random weights and non-trivial batch-norm statistics, deterministic."""
    torch.manual_seed(seed)
    module = TorchvisionDenseNet121()
    for layer in module.modules():
        if isinstance(layer, nn.BatchNorm2d):
            assert layer.running_mean is not None
            assert layer.running_var is not None
            layer.running_mean.uniform_(-0.1, 0.1)
            layer.running_var.uniform_(0.5, 1.5)
            layer.weight.data.uniform_(0.5, 1.5)
    module.classifier.weight.data.normal_(0, 1.0)  # spread the outputs away from 0.5
    return module.eval()
