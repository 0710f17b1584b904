"""Loaders for the shared benchmark data (``../shared/data``): full MNIST (IDX, gzip) and CIFAR-10 as JPEG.

The shipped demo never uses these (it has its own embedded subset); tests that need them skip when the
directory is missing, and benchmarks fail with a message naming the missing file.
"""

from __future__ import annotations

import gzip
import io
import os

import numpy as np

from tvm_lut.errors import CalibrationError

#: Where the project's checkout expects the shared data: ``<repo>/../shared/data``.
SHARED_DATA = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data"))

CIFAR_MEAN = np.array([0.4913, 0.4821, 0.4465], np.float32)  # of the decoded JPEG train set (MANIFEST)
CIFAR_STD = np.array([0.2452, 0.2428, 0.2606], np.float32)


def _need(path: str) -> str:
    if not os.path.exists(path):
        raise CalibrationError(f"dataset file not found: {path}")
    return path


def load_mnist(root: str | None = None) -> dict[str, np.ndarray]:
    """Full MNIST as uint8 images (N, 28, 28) and int64 labels: train_images/labels, test_images/labels."""
    root = root or os.path.join(SHARED_DATA, "mnist")

    def read(name: str, offset: int, shape) -> np.ndarray:
        with gzip.open(_need(os.path.join(root, name))) as f:
            return np.frombuffer(f.read(), np.uint8, offset=offset).reshape(shape)

    return {
        "train_images": read("train-images-idx3-ubyte.gz", 16, (-1, 28, 28)),
        "train_labels": read("train-labels-idx1-ubyte.gz", 8, (-1,)).astype(np.int64),
        "test_images": read("t10k-images-idx3-ubyte.gz", 16, (-1, 28, 28)),
        "test_labels": read("t10k-labels-idx1-ubyte.gz", 8, (-1,)).astype(np.int64),
    }


def load_cifar10(split: str, root: str | None = None, limit: int | None = None, seed: int = 0, raw: bool = False):
    """CIFAR-10 (JPEG re-encoding) -> (float32 NCHW normalised images, int64 labels), or with ``raw`` the
    decoded uint8 NHWC pixels (``normalize_cifar10`` makes the former of them).

    Records are stored sorted by class, so they are shuffled with ``seed`` before ``limit`` is applied.
    """
    from PIL import Image

    root = root or os.path.join(SHARED_DATA, "cifar10_jpeg")
    path = _need(os.path.join(root, f"{split}_jpeg.npz"))
    with np.load(path, allow_pickle=False) as packed:
        blob, offsets, labels = packed["jpeg"], packed["offsets"], packed["labels"].astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    if limit is not None:
        order = order[:limit]
    images = np.empty((len(order), 32, 32, 3), np.uint8)
    for i, j in enumerate(order):
        with Image.open(io.BytesIO(blob[offsets[j] : offsets[j + 1]].tobytes())) as im:
            images[i] = np.asarray(im.convert("RGB"))
    return (images if raw else normalize_cifar10(images)), labels[order]


def normalize_cifar10(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC pixels -> float32 NCHW, normalised with the train set's channel mean and std."""
    x = (images.astype(np.float32) / 255.0 - CIFAR_MEAN) / CIFAR_STD
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
