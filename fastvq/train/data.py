"""Datasets for the bundled models, and a resumable batch iterator.

Three sources, all held in memory as uint8 (N, C, H, W) tensors:

- ``shapes`` (the default): circles, squares and triangles in 12 palette colours on a plain
  background of another palette colour, drawn procedurally by this module (32x32 RGB,
  anti-aliased by 2x supersampling). The same seed gives the same images on every machine;
  train and validation come from different seeds, so they never share an image. The label is
  the kind of the largest shape (0 circle, 1 square, 2 triangle). Nothing is downloaded.
- ``digits``: scikit-learn's 8x8 digits (shipped inside sklearn), upsampled to the image size,
  grey as RGB; labels 0-9. Only when sklearn is installed.
- a folder path: every image file under it (recursively, sorted), read with Pillow, centre-cropped
  and resized. An unreadable or corrupt file raises ``CorruptImageError`` naming it; files with
  other extensions are listed in a warning, never skipped silently. Labels are the index of the
  first-level sub-folder when the images sit in sub-folders, else 0.

Batches are float tensors in [-1, 1]. ``BatchIterator`` draws an epoch's order from
``(seed, epoch)`` alone, so its whole state is two integers (epoch, position): a resumed run
sees exactly the batches the uninterrupted one would have seen.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SHAPE_KINDS = ("circle", "square", "triangle")
BUILTIN_DATASETS = ("shapes", "digits")
# the shapes' palette: 12 colours far apart in RGB, as floats in [0, 1]
PALETTE = np.array([
    [0.90, 0.10, 0.10], [0.10, 0.60, 0.15], [0.15, 0.25, 0.85], [0.95, 0.85, 0.10], [0.95, 0.50, 0.05],
    [0.55, 0.15, 0.70], [0.10, 0.75, 0.80], [0.95, 0.45, 0.70], [0.97, 0.97, 0.95], [0.08, 0.08, 0.10],
    [0.50, 0.50, 0.50], [0.55, 0.35, 0.15],
], dtype=np.float32)


class CorruptImageError(ValueError):
    """An image file under a dataset folder could not be read; ``path`` names it."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"cannot read image {str(path)!r}: {reason}")
        self.path = path


@dataclass
class ImageDataset:
    """Images in memory. images: (N, C, H, W) uint8; labels: (N,) int64."""

    images: Tensor
    labels: Tensor
    num_classes: int
    name: str

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    def batch(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """Images at ``index`` as float (B, C, H, W) in [-1, 1], and their (B,) int64 labels."""
        return to_float(self.images[index]), self.labels[index]


def to_float(images: Tensor) -> Tensor:
    """uint8 (..., H, W) in [0, 255] -> float32 in [-1, 1]."""
    return images.float().div(127.5).sub(1.0)


def to_uint8(images: Tensor) -> Tensor:
    """float in [-1, 1] (clamped) -> uint8 in [0, 255]."""
    return images.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)


# ---------------------------------------------------------------------------------------------
# the built-in shapes


def make_shapes(num: int, seed: int, size: int = 32, max_shapes: int = 2) -> tuple[Tensor, Tensor]:
    """Draw ``num`` images of 1..max_shapes coloured shapes on a plain background.

    Returns:
        images: (num, 3, size, size) uint8; labels: (num,) int64, kind of the largest shape.
    """
    if num < 0 or size < 8 or max_shapes < 1:
        raise ValueError(f"need num >= 0, size >= 8, max_shapes >= 1; got {num}, {size}, {max_shapes}")
    rng = np.random.default_rng(seed)
    s = 2 * size  # drawn at 2x, then 2x2-averaged: anti-aliased edges
    # colours come from a fixed palette: a discrete world a small codebook and a prior can learn
    bg = rng.integers(0, len(PALETTE), num)
    fg = (bg[:, None] + rng.integers(1, len(PALETTE), (num, max_shapes))) % len(PALETTE)  # never the background's
    background, colour = PALETTE[bg], PALETTE[fg]  # (num, 3), (num, max_shapes, 3)
    count = rng.integers(1, max_shapes + 1, num)
    kinds = rng.integers(0, len(SHAPE_KINDS), (num, max_shapes))
    radius = np.sort(rng.uniform(0.16, 0.32, (num, max_shapes)), axis=1)[:, ::-1]  # largest first
    radius = (radius * s).astype(np.float32)
    centre = (rng.uniform(0.25, 0.75, (num, max_shapes, 2)) * s).astype(np.float32)

    out = np.empty((num, 3, size, size), dtype=np.uint8)
    yy, xx = np.meshgrid(np.arange(s, dtype=np.float32) + 0.5, np.arange(s, dtype=np.float32) + 0.5, indexing="ij")
    for start in range(0, num, 512):
        sl = slice(start, min(start + 512, num))
        n = sl.stop - sl.start
        img = np.broadcast_to(background[sl, :, None, None], (n, 3, s, s)).copy()  # (n, 3, s, s)
        for k in range(max_shapes):
            dx = xx[None] - centre[sl, k, 0, None, None]  # (n, s, s)
            dy = yy[None] - centre[sl, k, 1, None, None]
            r = radius[sl, k, None, None]
            circle = dx**2 + dy**2 <= r**2
            square = np.maximum(np.abs(dx), np.abs(dy)) <= 0.8 * r
            top, bottom = -r, 0.75 * r  # an upward triangle: apex at dy=-r, base at dy=0.75r
            triangle = (dy >= top) & (dy <= bottom) & (np.abs(dx) <= (dy - top) / (bottom - top) * r)
            kind = kinds[sl, k, None, None]
            mask = np.where(kind == 0, circle, np.where(kind == 1, square, triangle))
            mask &= (k < count[sl])[:, None, None]
            img = np.where(mask[:, None], colour[sl, k, :, None, None], img)
        img = img.reshape(n, 3, size, 2, size, 2).mean(axis=(3, 5))
        out[sl] = np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)
    return torch.from_numpy(out), torch.from_numpy(kinds[:, 0].astype(np.int64))


# ---------------------------------------------------------------------------------------------
# sklearn digits and image folders


def _digits(size: int) -> tuple[Tensor, Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ValueError("dataset 'digits' needs scikit-learn: pip install scikit-learn") from err
    bunch = load_digits()
    x = torch.from_numpy(bunch.images).float()[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    return x, torch.from_numpy(bunch.target).long()


def _read_image(path: Path, size: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            im = im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise CorruptImageError(path, f"{type(err).__name__}: {err}") from err
    w, h = im.size
    side = min(w, h)
    im = im.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
    im = im.resize((size, size), Image.BICUBIC)
    return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)  # (3, size, size)


def load_folder(root: str | Path, size: int = 32) -> tuple[Tensor, Tensor, int]:
    """Every image under ``root`` as (N, 3, size, size) uint8, labels (N,), number of classes.

    Raises:
        FileNotFoundError: root missing. ValueError: no images under it.
        CorruptImageError: a file with an image extension that Pillow cannot read.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {str(root)!r} does not exist (or is not a folder)")
    files = sorted(p for p in root.rglob("*") if p.is_file())
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    others = [p for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS and not p.name.startswith(".")]
    if others:
        shown = ", ".join(str(p.relative_to(root)) for p in others[:5])
        warnings.warn(
            f"{len(others)} file(s) under {str(root)!r} are not images ({IMAGE_EXTENSIONS}) and are not used: "
            f"{shown}{' ...' if len(others) > 5 else ''}",
            stacklevel=2,
        )
    if not images:
        raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {str(root)!r}")
    classes = sorted({p.relative_to(root).parts[0] for p in images if len(p.relative_to(root).parts) > 1})
    class_index = {c: i for i, c in enumerate(classes)}
    labels = [class_index.get(p.relative_to(root).parts[0], 0) if len(p.relative_to(root).parts) > 1 else 0
              for p in images]
    array = np.stack([_read_image(p, size) for p in images])
    return torch.from_numpy(array), torch.tensor(labels, dtype=torch.int64), max(len(classes), 1)


def load_dataset(
    name: str = "shapes", image_size: int = 32, seed: int = 0, num_train: int = 16384, num_val: int = 1024,
    val_fraction: float = 0.1,
) -> tuple[ImageDataset, ImageDataset]:
    """The (train, validation) pair for ``name``: "shapes", "digits", or a folder path.

    ``num_train`` / ``num_val`` size the procedural shapes; the others split their images with a
    seeded permutation, ``val_fraction`` of them (at least one) for validation.
    """
    if name == "shapes":
        tx, ty = make_shapes(num_train, seed=2 * seed, size=image_size)
        vx, vy = make_shapes(num_val, seed=2 * seed + 1, size=image_size)
        return ImageDataset(tx, ty, 3, "shapes"), ImageDataset(vx, vy, 3, "shapes")
    if name == "digits":
        x, y = _digits(image_size)
        num_classes = 10
    elif Path(name).is_dir():
        x, y, num_classes = load_folder(name, image_size)
    else:
        raise ValueError(f"dataset must be one of {BUILTIN_DATASETS} or an existing folder of images, got {name!r}")
    if len(x) < 2:
        raise ValueError(f"dataset {name!r} has {len(x)} image(s); need at least 2 for a train/validation split")
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_val = min(max(1, int(round(len(x) * val_fraction))), len(x) - 1)
    val, train = order[:n_val], order[n_val:]
    return (ImageDataset(x[train], y[train], num_classes, str(name)),
            ImageDataset(x[val], y[val], num_classes, str(name)))


# ---------------------------------------------------------------------------------------------
# batches


class BatchIterator:
    """Endless shuffled batches whose order depends only on (seed, epoch): resumable exactly.

    Each epoch is a fresh permutation drawn from a generator seeded with ``(seed, epoch)``; the
    last incomplete batch of an epoch is dropped. ``state()`` / the constructor's ``epoch`` and
    ``position`` arguments save and restore where it is.

    Yields ``dataset.batch``'s (x, y): for images x (B, C, H, W) float in [-1, 1], y (B,) int64.
    """

    def __init__(self, dataset: ImageDataset | CodeDataset, batch_size: int, seed: int = 0, epoch: int = 0,
                 position: int = 0):
        if batch_size < 1 or batch_size > len(dataset):
            raise ValueError(f"batch_size must be in [1, {len(dataset)}] (the dataset size), got {batch_size}")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.epoch, self.position = epoch, position
        self._order = self._permutation(epoch)

    def _permutation(self, epoch: int) -> Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.dataset), generator=g)

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        if self.position + self.batch_size > len(self.dataset):
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        index = self._order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return self.dataset.batch(index)


@dataclass
class CodeDataset:
    """The prior's data: the code indices of images, codes (N, h, w) int64, with their labels (N,) int64."""

    codes: Tensor
    labels: Tensor
    num_classes: int = 1

    def __len__(self) -> int:
        return self.codes.shape[0]

    def batch(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """Codes (B, h, w) and labels (B,) at ``index``."""
        return self.codes[index], self.labels[index]
