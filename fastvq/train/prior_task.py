"""The transformer prior's task: the codes of a trained VQ model as data, samples as pictures.

``prepare_prior`` takes the VQ model already loaded (fastvq.train.runs loads run folders), so this
module depends only on the model, the data and the pictures.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fastvq.models.prior import PriorConfig, TransformerPrior
from fastvq.train.config import TrainConfig
from fastvq.train.data import CodeDataset, ImageDataset, to_float
from fastvq.train.images import save_grid
from fastvq.train.trainer import resolve_device


@torch.no_grad()
def encode_dataset(vq: nn.Module, data: ImageDataset, device: torch.device, batch: int = 256) -> torch.Tensor:
    """All images of ``data`` as code indices (N, h, w) int64 (on the CPU), by the frozen ``vq``."""
    chunks = (to_float(data.images[i : i + batch]).to(device) for i in range(0, len(data), batch))
    return torch.cat([vq.encode_indices(x).cpu() for x in chunks])


class PriorTask:
    """Train on code sequences; judge by validation cross-entropy and decoded samples."""

    def __init__(self, train_set: CodeDataset, val_set: CodeDataset, eval_batch: int = 256) -> None:
        self.train_set, self.val_set, self.eval_batch = train_set, val_set, eval_batch

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        """Mean validation cross-entropy ("loss", nats per code) and bits per code."""
        total, n = 0.0, len(self.val_set)
        for start in range(0, n, self.eval_batch):
            x, y = self.val_set.batch(torch.arange(start, min(start + self.eval_batch, n)))
            total += float(model.training_losses(x.to(device), y.to(device))["loss"]) * x.shape[0]
        loss = total / n
        return {"loss": loss, "bits_per_code": loss / 0.6931471805599453}

    @torch.no_grad()
    def artifacts(self, model: nn.Module, run_dir: Path, device: torch.device, cfg: TrainConfig) -> None:
        """samples.png: ``cfg.num_samples`` images decoded from sampled codes (fixed seed)."""
        g = torch.Generator().manual_seed(cfg.seed)
        save_grid(Path(run_dir) / "samples.png", model.generate_images(cfg.num_samples, generator=g).float())


def prepare_prior(model_cfg: PriorConfig, train_cfg: TrainConfig, vq: nn.Module, train_set: ImageDataset,
                  val_set: ImageDataset) -> tuple[TransformerPrior, PriorTask, PriorConfig]:
    """Encode the datasets into codes with the frozen ``vq`` (it has ``encode_indices``), size the prior from them.

    Returns (prior with ``vq`` attached, its task, ``model_cfg`` with vocab_size, seq_len and num_classes set).
    """
    device = resolve_device(train_cfg.device)
    train_codes, val_codes = encode_dataset(vq, train_set, device), encode_dataset(vq, val_set, device)
    model_cfg.vocab_size = vq.cfg.codebook_size
    model_cfg.seq_len = train_codes.shape[1] * train_codes.shape[2]
    model_cfg.num_classes = train_set.num_classes if model_cfg.class_cond else 0
    prior = TransformerPrior(model_cfg)
    prior.attach_vq(vq)
    task = PriorTask(CodeDataset(train_codes, train_set.labels, train_set.num_classes),
                     CodeDataset(val_codes, val_set.labels, val_set.num_classes))
    return prior, task, model_cfg
