"""Shared fixtures: small torch models (random weights unless trained) and helpers."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")

torch.set_num_threads(2)


class SmallCNN(nn.Module):
    """conv(bias)+BN, a strided/padded/dilated conv, a grouped conv, and two dense layers."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(),
            nn.Conv2d(24, 32, 3, stride=2, padding=2, dilation=2, bias=False), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1, groups=4), nn.ReLU(),
        )
        self.fc1 = nn.Linear(32 * 4 * 4, 40)
        self.fc2 = nn.Linear(40, 10)

    def forward(self, x):
        x = self.features(x)
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


@pytest.fixture(scope="session")
def small_cnn():
    torch.manual_seed(0)
    return randomize_bn(SmallCNN())


@pytest.fixture(scope="session")
def small_inputs():
    rng = np.random.default_rng(0)
    return rng.standard_normal((64, 3, 8, 8)).astype(np.float32)


def mnist_dir() -> str:
    return os.path.abspath(os.path.join(SHARED, "mnist"))
