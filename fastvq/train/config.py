"""The training run's config: one dataclass, with per-model presets ("tiny" on a CPU, "base" on a GPU)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastvq.models.config import Config, option

_TINY_IMAGE = {"steps": 700, "batch_size": 32, "lr": 2e-3, "eval_every": 175}
_BASE_IMAGE = {"steps": 20000, "batch_size": 128, "lr": 4e-4, "eval_every": 1000, "num_train": 65536, "amp": True}

# per model: the fields that differ from TrainConfig's defaults, by preset
TRAIN_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "ae": {"tiny": _TINY_IMAGE, "base": _BASE_IMAGE},
    "vae": {"tiny": _TINY_IMAGE, "base": _BASE_IMAGE},
    "vqvae": {"tiny": _TINY_IMAGE, "base": _BASE_IMAGE},
    "vqgan": {"tiny": {**_TINY_IMAGE, "lr": 1e-3}, "base": {**_BASE_IMAGE, "lr": 2e-4}},
    "prior": {"tiny": {"steps": 1500, "batch_size": 64, "lr": 2e-3, "eval_every": 500, "weight_decay": 0.01},
              "base": {"steps": 20000, "batch_size": 128, "lr": 3e-4, "eval_every": 1000, "num_train": 65536,
                       "amp": True, "weight_decay": 0.1}},
}


@dataclass
class TrainConfig(Config):
    dataset: str = option("shapes", "'shapes' (built in), 'digits' (needs scikit-learn) or a folder of images")
    image_size: int = option(32, "images are resized (centre crop) to this size")
    num_train: int = option(16384, "'shapes' only: number of training images to draw")
    num_val: int = option(1024, "'shapes' only: number of validation images to draw")
    steps: int = option(600, "optimizer steps in total")
    batch_size: int = option(32, "images per micro-batch")
    grad_accum: int = option(1, "micro-batches per optimizer step (gradient accumulation)")
    lr: float = option(2e-3, "peak learning rate (AdamW), after a linear warm-up then cosine decay")
    min_lr_ratio: float = option(0.1, "the cosine decay ends at lr * min_lr_ratio")
    warmup_steps: int = option(20, "linear learning-rate warm-up steps")
    weight_decay: float = option(0.0, "AdamW weight decay")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.99, "AdamW beta2")
    grad_clip: float = option(1.0, "clip each optimizer's gradient norm to this (0: off)")
    amp: bool = option(False, "bf16 autocast (mixed precision)")
    compile: bool = option(False, "torch.compile the training step")
    seed: int = option(0, "seed of the data, the data order and the model init")
    device: str = option("auto", "'auto' (cuda when available), 'cpu', 'cuda', ...")
    log_every: int = option(10, "write training metrics every N steps")
    eval_every: int = option(200, "evaluate, write pictures and a checkpoint every N steps (and at the end)")
    num_samples: int = option(64, "images in the sample grid")


def train_preset(model: str, preset: str, **overrides: Any) -> TrainConfig:
    """The training config for ``model`` at ``preset``, with ``overrides`` on top.

    Raises:
        ValueError: unknown model, preset or field.
    """
    if model not in TRAIN_PRESETS:
        raise ValueError(f"model must be one of {sorted(TRAIN_PRESETS)}, got {model!r}")
    presets = TRAIN_PRESETS[model]
    if preset not in presets:
        raise ValueError(f"preset must be one of {sorted(presets)}, got {preset!r}")
    return TrainConfig.from_dict({**presets[preset], **overrides})
