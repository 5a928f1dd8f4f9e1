"""Runs of the bundled models: building a run's data, model and task from its configs
(``prepare_run``), and loading a run folder back (``read_run_config``, ``load_run``).

A run folder holds config.json (model name, model config, training config and, for a prior, the
VQ run it models), the checkpoint/ folder and what the trainer writes beside them (trainer.py).
Errors a user can fix (not a run folder, the wrong kind of run) are FileNotFoundError and
ValueError; the CLI turns them into one-line messages.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from fastvq.models import build_model
from fastvq.models.config import Config
from fastvq.models.prior import PriorConfig, TransformerPrior
from fastvq.train.checkpoint import load_model_weights
from fastvq.train.config import TrainConfig
from fastvq.train.data import load_dataset
from fastvq.train.prior_task import prepare_prior
from fastvq.train.tasks import ImageTask
from fastvq.train.trainer import resolve_device


def read_run_config(run: str | Path) -> dict[str, Any]:
    """config.json of the run folder ``run``.

    Raises:
        FileNotFoundError: ``run`` is not a run folder (no config.json in it).
    """
    path = Path(run) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{str(run)!r} is not a run folder (no config.json)")
    return json.loads(path.read_text())


def prepare_run(
    name: str, model_cfg: Config, train_cfg: TrainConfig, extra: dict[str, Any]
) -> tuple[nn.Module, Any, Config]:
    """Data, model and task for a training run of model ``name``; a prior needs ``extra["vqvae_run"]``.

    Returns (model, task, model_cfg as completed from the data: image channels, or the prior's
    vocabulary and sequence length).

    Raises:
        ValueError: an unknown dataset, or a prior's VQ run that is not a vqvae / vqgan run.
        FileNotFoundError: a prior's VQ run folder, or its checkpoint, is missing.
    """
    train_set, val_set = load_dataset(train_cfg.dataset, train_cfg.image_size, train_cfg.seed,
                                      num_train=train_cfg.num_train, num_val=train_cfg.num_val)
    if name == "prior":
        vq = load_vq_run(extra["vqvae_run"], device=train_cfg.device)
        return prepare_prior(model_cfg, train_cfg, vq, train_set, val_set)
    model_cfg.in_channels = train_set.channels
    return build_model(name, model_cfg), ImageTask(train_set, val_set), model_cfg


def load_run(run: str | Path, device: str = "auto") -> tuple[nn.Module, dict[str, Any]]:
    """The trained model of a run folder (weights from its checkpoint, in eval mode) and its config.json.

    A prior comes back with its VQ model attached (``prior.vq``), loaded from the run it names.

    Raises:
        FileNotFoundError: not a run folder, or no checkpoint in it.
    """
    run = Path(run)
    saved = read_run_config(run)
    if saved["model"] == "prior":
        model = TransformerPrior(PriorConfig.from_dict(saved["model_config"]))
        load_model_weights(run / "checkpoint", model)
        model.attach_vq(load_vq_run(saved["vqvae_run"], device))
    else:
        model = build_model(saved["model"], saved["model_config"])
        load_model_weights(run / "checkpoint", model)
    return model.to(resolve_device(device)).eval(), saved


def load_vq_run(run: str | Path, device: str = "auto") -> nn.Module:
    """The frozen VQ model (eval mode, no gradients) of a vqvae or vqgan run, for a prior to model its codes.

    Raises:
        ValueError: the run holds another kind of model (one without code indices).
        FileNotFoundError: not a run folder, or no checkpoint in it.
    """
    vq, saved = load_run(run, device)
    if not hasattr(vq, "encode_indices"):
        raise ValueError(f"{str(run)!r} is a {saved['model']!r} run; the prior needs a vqvae or vqgan run")
    for p in vq.parameters():
        p.requires_grad_(False)
    return vq


__all__ = ["load_run", "load_vq_run", "prepare_run", "read_run_config"]
