"""What the trainer trains on and how a run is judged: data, validation metrics, pictures.

``ImageTask`` serves the image models (AE, VAE, VQ-VAE, VQ-GAN): validation PSNR over the whole
validation set, the model's validation losses, and for VQ models the code usage measured on the
validation set (fraction of codes used, perplexity). Pictures: reconstructions.png (rows of
validation images, each followed by its reconstruction) and samples.png where the model can
sample. The prior's task lives in fastvq.train.prior_task.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fastvq.metrics import psnr
from fastvq.models.vqvae import usage_stats
from fastvq.train.data import ImageDataset, to_float
from fastvq.train.images import reconstruction_grid, save_grid


class ImageTask:
    """Images in, reconstructions out. ``eval_batch`` bounds memory during validation."""

    def __init__(self, train_set: ImageDataset, val_set: ImageDataset, eval_batch: int = 256) -> None:
        self.train_set, self.val_set, self.eval_batch = train_set, val_set, eval_batch

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        """Mean validation losses, PSNR (dB, images in [0, 1]) and, for VQ models, code usage."""
        sums: dict[str, float] = {}
        sq_err, n_pix, indices = 0.0, 0, []
        n = len(self.val_set)
        for start in range(0, n, self.eval_batch):
            x = to_float(self.val_set.images[start : start + self.eval_batch]).to(device)
            y = self.val_set.labels[start : start + self.eval_batch].to(device)
            b = x.shape[0]
            if hasattr(model, "validation_step"):  # VQ models: losses, reconstruction and codes in one pass
                losses, x_hat, idx = model.validation_step(x, y)
                indices.append(idx.cpu())
            else:
                losses, x_hat = model.training_losses(x, y), model.reconstruct(x)
            for k, v in losses.items():
                if k != "psnr":
                    sums[k] = sums.get(k, 0.0) + float(v) * b
            x_hat = x_hat.float().clamp(-1, 1)
            sq_err += float(((x_hat - x) ** 2).sum())
            n_pix += x.numel()
        metrics = {k: v / n for k, v in sums.items() if k != "loss"} | {"loss": sums["loss"] / n}
        metrics["psnr"] = float(psnr(torch.tensor(sq_err / n_pix)))
        if indices:
            metrics.update(usage_stats(torch.cat(indices), model.cfg.codebook_size))
        return metrics

    @torch.no_grad()
    def artifacts(self, model: nn.Module, run_dir: Path, device: torch.device, cfg) -> None:
        """reconstructions.png (32 validation images and their reconstructions) and samples.png."""
        x = to_float(self.val_set.images[:32]).to(device)
        save_grid(Path(run_dir) / "reconstructions.png", reconstruction_grid(x, model.reconstruct(x).float()))
        if hasattr(model, "sample"):
            g = torch.Generator().manual_seed(cfg.seed)
            samples = model.sample(cfg.num_samples, self.val_set.image_size, generator=g)
            save_grid(Path(run_dir) / "samples.png", samples.float())
