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


class BasicBlock(nn.Module):
    """ResNet basic block: conv3x3-BN-ReLU-conv3x3-BN + shortcut (1x1 conv + BN when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet: a 3x3 stem, len(widths) stages of ``blocks`` basic blocks, global pool, fc.

    ``CifarResNet()`` is ResNet-20 (16-32-64 channels, 3 blocks per stage, 0.27 M params);
    ``CifarResNet(widths=(64, 128, 256, 512), blocks=2)`` is the ResNet-18-class shape LUT-NN reports on.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, widths=(16, 32, 64), blocks: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(blocks):
                layers.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.layers(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class VGGSmall(nn.Module):
    """A small VGG for 32x32 images: three stages of two 3x3 conv + BN + ReLU (``widths``), 2x2 max
    pooling after each, then dense 2048 -> 128 -> classes. Plain chains (no residuals), the shape
    the low-rank, butterfly and channel-pruning papers report on; sized to train on a CPU."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, widths=(32, 64, 128), hidden: int = 128):
        super().__init__()
        layers, c = [], in_channels
        for w in widths:
            for _ in range(2):
                layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
                c = w
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(c * 4 * 4, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

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


def random_crop_flip(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """The standard CIFAR augmentation on a batch: random crop of a zero-padded image, random h-flip."""
    n, _, h, w = x.shape
    xp = nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, x.shape[1], h, w + 2 * pad)
    xp = torch.gather(xp, 2, rows)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, x.shape[1], h, w)
    out = torch.gather(xp, 3, cols)
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(3)
    return out


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
    optimizer: str = "adam",
    augment: bool = False,
    weight_decay: float = 0.0,
) -> nn.Module:
    """Cross-entropy training, seeded; returns the model in eval mode.

    ``optimizer="adam"`` (constant ``lr``) suits the small MNIST models; ``"sgd"`` (momentum 0.9, one-cycle
    schedule peaking at ``lr``) with ``augment=True`` (random crop + flip) is the usual CIFAR recipe.
    """
    from tqdm import tqdm

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    steps_per_epoch = (len(x) + batch_size - 1) // batch_size
    steps = epochs * steps_per_epoch
    sched = None
    if optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.25)
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}: 'adam' or 'sgd'")
    model.train()
    bar = tqdm(total=steps, desc="training", unit="step", disable=None if progress else True, leave=False)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            idx = perm[i : i + batch_size]
            xb = random_crop_flip(x[idx], gen) if augment else x[idx]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xb), y[idx])
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    return model.eval()


def predict(model: nn.Module, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """Logits of ``model`` (eval mode, no grad) over a numpy dataset, in batches."""
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            out.append(model(torch.from_numpy(images[i : i + batch_size])).numpy())
    return np.concatenate(out)


def save_state(model: nn.Module, path: str) -> None:
    """A model's state dict as a plain .npz (no pickle), written atomically."""
    import os

    tmp = path + ".tmp.npz"
    np.savez(tmp, **{k: v.detach().cpu().numpy() for k, v in model.state_dict().items()})
    os.replace(tmp, path)


def load_state(model: nn.Module, path: str) -> nn.Module:
    """Load a state dict written by ``save_state`` (strict: every key must match)."""
    with np.load(path, allow_pickle=False) as data:
        model.load_state_dict({k: torch.from_numpy(data[k].copy()) for k in data.files})
    return model.eval()


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in percent."""
    return float((np.asarray(logits).argmax(-1) == np.asarray(labels)).mean() * 100.0)
