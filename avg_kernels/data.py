"""Datasets that need no download: scikit-learn's embedded digits, or MNIST IDX files given a path."""
from __future__ import annotations

import gzip
import os
import struct
from typing import NamedTuple

import numpy as np
import torch


class Split(NamedTuple):
    """Images (N, 1, H, W) float32 scaled to [0, 1] and labels (N,) int64."""

    x: torch.Tensor
    y: torch.Tensor


def digits(test_fraction: float = 0.25, seed: int = 0) -> tuple[Split, Split]:
    """scikit-learn's 8x8 digits (1797 images, shipped inside the package), split train/test."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - scikit-learn is a demo dependency
        raise ImportError("the digits data set comes from scikit-learn: pip install scikit-learn") from exc
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    return _split(x, y, test_fraction, seed)


def mnist(path: str) -> tuple[Split, Split]:
    """MNIST from the four IDX files (optionally .gz) in folder ``path``; nothing is downloaded."""
    def find(stem):
        for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
            full = os.path.join(path, name)
            if os.path.exists(full):
                return full
        raise FileNotFoundError(f"--data {path!r}: no {stem}[.gz] there (expected the four MNIST IDX files)")

    def read(stem):
        fname = find(stem)
        with (gzip.open if fname.endswith(".gz") else open)(fname, "rb") as f:
            raw = f.read()
        magic, = struct.unpack(">I", raw[:4])
        ndim = magic & 0xFF
        dims = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
        return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)

    def split(prefix):
        x = torch.tensor(read(f"{prefix}-images-idx3-ubyte"), dtype=torch.float32).unsqueeze(1) / 255.0
        y = torch.tensor(read(f"{prefix}-labels-idx1-ubyte"), dtype=torch.int64)
        return Split(x, y)

    return split("train"), split("t10k")


def _split(x, y, test_fraction, seed):
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    n_test = int(round(len(y) * test_fraction))
    test, train = perm[:n_test], perm[n_test:]
    return Split(x[train], y[train]), Split(x[test], y[test])
