"""Pictures a person can judge a run by: image grids (Pillow) and the loss curve (matplotlib)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fastvq.train.checkpoint import atomic_write
from fastvq.train.data import to_uint8


def image_grid(images: Tensor, nrow: int = 8, padding: int = 2, scale: int = 2) -> np.ndarray:
    """Tile images into one picture.

    Args:
        images: (N, C, H, W) float in [-1, 1] (clamped), C = 1 or 3.
        nrow: images per row. padding: white pixels between them. scale: nearest-neighbour zoom.

    Returns:
        (rows * (H + pad) + pad) * scale by (nrow * (W + pad) + pad) * scale RGB uint8 array.
    """
    x = to_uint8(images).cpu()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    n, _, h, w = x.shape
    rows = (n + nrow - 1) // nrow
    grid = torch.full((3, rows * (h + padding) + padding, nrow * (w + padding) + padding), 255, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + c * (w + padding)
        grid[:, top : top + h, left : left + w] = x[i]
    array = grid.permute(1, 2, 0).numpy()
    return array.repeat(scale, axis=0).repeat(scale, axis=1)


def save_grid(path: Path, images: Tensor, nrow: int = 8, scale: int = 2) -> None:
    """Save ``images`` (N, C, H, W) in [-1, 1] as a PNG grid at ``path`` (atomically)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image_grid(images, nrow=nrow, scale=scale)).save(buf, format="PNG")
    atomic_write(Path(path), buf.getvalue())


def reconstruction_grid(x: Tensor, x_hat: Tensor, nrow: int = 8) -> Tensor:
    """Interleave rows of originals and reconstructions: (2N, C, H, W), originals first in each pair of rows."""
    n = (x.shape[0] // nrow) * nrow or x.shape[0]
    x, x_hat = x[:n], x_hat[:n]
    pairs = torch.stack([x.reshape(-1, nrow, *x.shape[1:]), x_hat.reshape(-1, nrow, *x.shape[1:])], dim=1)
    return pairs.reshape(-1, *x.shape[1:])


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl file (empty list when missing)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss_curve(metrics_path: Path, out_path: Path, title: str = "") -> None:
    """Plot training losses (log scale) and validation metrics from metrics.jsonl into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [r for r in records if r.get("split") == "train"]
    val = [r for r in records if r.get("split") == "val"]
    skip = {"step", "split", "time_s", "lr", "codes_used", "perplexity", "psnr", "grad_norm", "disc_weight"}
    keys = [k for k in (train[0] if train else {}) if k not in skip and isinstance(train[0][k], (int, float))]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for k in keys:
        pts = [(r["step"], r[k]) for r in train if k in r and r[k] > 0]
        if pts:
            axes[0].plot([p[0] for p in pts], [p[1] for p in pts], label=k, lw=1)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("step")
    axes[0].set_title("training losses")
    axes[0].legend(fontsize=8)
    val_keys = [k for k in ("psnr", "codes_used_fraction", "bits_per_token", "loss") if val and k in val[-1]]
    ax = axes[1]
    for i, k in enumerate(val_keys[:2]):
        target = ax if i == 0 else ax.twinx()
        target.plot([r["step"] for r in val], [r[k] for r in val], "o-", color=f"C{i}", label=f"val {k}")
        target.set_ylabel(f"val {k}", color=f"C{i}")
        if k == "codes_used_fraction":
            target.set_ylim(0, 1.05)
    ax.set_xlabel("step")
    ax.set_title("validation")
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write(Path(out_path), buf.getvalue())
