"""Training the bundled models: trainer, checkpoints, tasks, pictures, and the CLI subcommands."""

from fastvq.train.checkpoint import load_checkpoint, save_checkpoint
from fastvq.train.config import TrainConfig, train_preset
from fastvq.train.trainer import Trainer

__all__ = ["TrainConfig", "Trainer", "load_checkpoint", "save_checkpoint", "train_preset"]
