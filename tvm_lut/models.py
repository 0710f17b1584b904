"""Small reference models and their training loop, used by the demo, tests and tutorials.

Only what the shipped demo needs lives in the package: a LeNet-5 for 28x28 digits, the embedded MNIST
subset, and a plain seeded training loop.
"""

from __future__ import annotations

from importlib import resources

import numpy as np
import torch
from torch import nn


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al. 1998) with ReLU and max-pooling: 2 convs + 3 dense layers, 61.7k params."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(16 * 5 * 5, 120), nn.ReLU(),
            nn.Linear(120, 84), nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def load_mnist_subset() -> dict[str, np.ndarray]:
    """The embedded MNIST subset as float32 NCHW in [0, 1] (normalised below) with int64 labels."""
    with resources.files("tvm_lut").joinpath("data/mnist_subset.npz").open("rb") as f:
        raw = np.load(f, allow_pickle=False)
        data = {k: raw[k] for k in raw.files}
    out = {}
    for split in ("train", "test"):
        out[f"{split}_images"] = normalize_mnist(data[f"{split}_images"])
        out[f"{split}_labels"] = data[f"{split}_labels"].astype(np.int64)
    return out


MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def normalize_mnist(images_u8: np.ndarray) -> np.ndarray:
    """uint8 (N, 28, 28) -> float32 (N, 1, 28, 28), standardised with the usual MNIST mean/std."""
    x = images_u8.astype(np.float32)[:, None] / 255.0
    return (x - MNIST_MEAN) / MNIST_STD


def train_classifier(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    epochs: int = 3,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
) -> nn.Module:
    """Adam + cross-entropy, seeded; returns the model in eval mode."""
    from tqdm import tqdm

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    bar = tqdm(total=steps, desc="training", unit="step", disable=None if progress else True, leave=False)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            idx = perm[i : i + batch_size]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            bar.update(1)
    bar.close()
    return model.eval()


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in percent."""
    return float((np.asarray(logits).argmax(-1) == np.asarray(labels)).mean() * 100.0)
