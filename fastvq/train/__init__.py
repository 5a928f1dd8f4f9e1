"""Training the bundled models. One module per job, in the order a run uses them:

    config.py      TrainConfig and its per-model presets
    data.py        the built-in shapes, image folders, the prior's CodeDataset, the resumable BatchIterator
    tasks.py       ImageTask: validation metrics and pictures of the image models
    prior_task.py  PriorTask: the transformer prior over a VQ model's codes
    trainer.py     Trainer: the training loop, logging, evaluation, exact resume
    checkpoint.py  atomic checkpoints in safetensors + JSON
    images.py      image grids and the loss curve
    runs.py        building a run from its configs, loading a run folder back
    cli.py         `fastvq train`, `fastvq sample`, `fastvq reconstruct`

Checkpoints, pictures and progress bars need the "train" extra (pip install 'fastvq-torch[train]');
those packages are imported where they are used, so importing this package needs the core only.
"""

from fastvq.train.checkpoint import load_checkpoint, save_checkpoint
from fastvq.train.config import TrainConfig, train_preset
from fastvq.train.trainer import Trainer

__all__ = ["TrainConfig", "Trainer", "load_checkpoint", "save_checkpoint", "train_preset"]
