"""Building a run's model and task from configs, and loading a finished run back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from fastvq.models.config import Config
from fastvq.train.checkpoint import load_model_weights
from fastvq.train.config import TrainConfig
from fastvq.train.data import ImageDataset, load_dataset
from fastvq.train.tasks import ImageTask
from fastvq.train.trainer import resolve_device


def _datasets(cfg: TrainConfig) -> tuple[ImageDataset, ImageDataset]:
    return load_dataset(cfg.dataset, cfg.image_size, cfg.seed, num_train=cfg.num_train, num_val=cfg.num_val)


def prepare_run(
    name: str, model_cfg: Config, train_cfg: TrainConfig, extra: dict[str, Any]
) -> tuple[nn.Module, Any, Config]:
    """Data, model and task for a training run. Returns (model, task, model_cfg as completed from the data)."""
    from fastvq.models import build_model

    train_set, val_set = _datasets(train_cfg)
    if name == "prior":
        from fastvq.train.prior_task import prepare_prior

        return prepare_prior(model_cfg, train_cfg, extra["vqvae_run"], train_set, val_set)
    model_cfg.in_channels = train_set.channels
    return build_model(name, model_cfg), ImageTask(train_set, val_set), model_cfg


def load_run(run: str | Path, device: str = "auto") -> tuple[nn.Module, dict[str, Any]]:
    """The trained model of a run folder (weights from its checkpoint, in eval mode) and its config.json.

    A prior comes back with its VQ model attached (``prior.vq``), loaded from the run it names.

    Raises:
        FileNotFoundError: not a run folder, or no checkpoint in it.
    """
    from fastvq.models import build_model

    run = Path(run)
    config_path = run / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{str(run)!r} is not a run folder (no config.json)")
    saved = json.loads(config_path.read_text())
    dev = resolve_device(device)
    if saved["model"] == "prior":
        from fastvq.models.prior import PriorConfig, TransformerPrior

        vq, _ = load_run(saved["vqvae_run"], device)
        model = TransformerPrior(PriorConfig.from_dict(saved["model_config"]))
        load_model_weights(run / "checkpoint", model)
        model.attach_vq(vq)
    else:
        model = build_model(saved["model"], saved["model_config"])
        load_model_weights(run / "checkpoint", model)
    return model.to(dev).eval(), saved


def no_grad_eval(model: nn.Module) -> nn.Module:
    """Freeze ``model``: eval mode, no gradients."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


__all__ = ["load_run", "no_grad_eval", "prepare_run"]
