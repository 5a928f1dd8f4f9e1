"""The training loop shared by every bundled model (nanoGPT-style: one loop you can read top to bottom).

A model plugs in through three methods:
    training_losses(x, y, step) -> dict of 0-d tensors; the keys of ``optim_groups()`` are optimised
    optim_groups() -> {loss key: parameters}   one AdamW per entry ("loss"; VQ-GAN adds "disc_loss")
and a *task* (fastvq.train.tasks) supplies the data, the validation metrics and the pictures.

The run folder it fills:
    config.json          model name, model config, training config (written by the CLI)
    metrics.jsonl        one JSON record per line: {"split": "train" | "val", "step": ..., ...}
    loss_curve.png       training losses and validation metrics
    reconstructions.png / samples.png   from the task
    checkpoint/          model.safetensors, train.safetensors, state.json (see checkpoint.py)
    summary.json         the final validation metrics, wall time, parameter count

Resuming restores the weights, optimizer moments, torch's RNG state and the data position, so the
resumed run produces the same losses as one that was never stopped.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastvq.train.checkpoint import atomic_write_json, load_checkpoint, save_checkpoint
from fastvq.train.config import TrainConfig
from fastvq.train.data import BatchIterator
from fastvq.train.images import plot_loss_curve, read_metrics


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up for ``warmup_steps``, then cosine decay from lr to lr * min_lr_ratio at ``steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class Trainer:
    """Trains ``model`` on ``task`` under ``cfg``, writing everything into ``run_dir``."""

    def __init__(self, model: nn.Module, task: Any, cfg: TrainConfig, run_dir: Path, progress: bool = True):
        self.cfg, self.task, self.run_dir, self.progress = cfg, task, Path(run_dir), progress
        self.device = resolve_device(cfg.device)
        self.model = model.to(self.device)
        self.groups = model.optim_groups()
        self.optimizers = {
            key: torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
            for key, params in self.groups.items()
        }
        self.step_fn = torch.compile(model.training_losses) if cfg.compile else model.training_losses
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.ckpt_dir = self.run_dir / "checkpoint"

    # -- bookkeeping ----------------------------------------------------------------------------

    def _log(self, record: dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def _truncate_metrics(self, step: int) -> None:
        """Drop records written after the checkpoint we resume from (they will be written again)."""
        kept = [r for r in read_metrics(self.metrics_path) if r["step"] <= step]
        self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def _autocast(self) -> contextlib.AbstractContextManager:
        if not self.cfg.amp:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def save(self, step: int, batches: BatchIterator, elapsed: float) -> None:
        save_checkpoint(self.ckpt_dir, step, self.model, self.optimizers,
                        {"data": batches.state(), "elapsed_s": elapsed, "train_config": self.cfg.to_dict()})

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        """Validation metrics (the task's), logged; pictures and the loss curve refreshed."""
        self.model.eval()
        with self._autocast():
            metrics = self.task.evaluate(self.model, self.device)
            self.task.artifacts(self.model, self.run_dir, self.device, self.cfg)
        self.model.train()
        self._log({"split": "val", "step": step, **metrics})
        plot_loss_curve(self.metrics_path, self.run_dir / "loss_curve.png", title=f"{self.run_dir.name} (step {step})")
        return metrics

    # -- the loop -------------------------------------------------------------------------------

    def fit(self, resume: bool = False, stop_at: int | None = None) -> dict[str, Any]:
        """Train to ``cfg.steps`` (or stop early after ``stop_at`` steps, as if killed); returns the summary."""
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        step, elapsed, data_state = 0, 0.0, {"epoch": 0, "position": 0}
        if resume:
            state = load_checkpoint(self.ckpt_dir, self.model, self.optimizers)
            step, elapsed, data_state = state["step"], state["elapsed_s"], state["data"]
            self._truncate_metrics(step)
        elif self.metrics_path.exists():
            self.metrics_path.unlink()
        batches = BatchIterator(self.task.train_set, cfg.batch_size, cfg.seed, **data_state)
        self.model.train()

        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=cfg.steps, initial=step, desc=self.run_dir.name, dynamic_ncols=True)
        t0 = time.perf_counter() - elapsed
        val: dict[str, float] = {}
        while step < cfg.steps and (stop_at is None or step < stop_at):
            lr = lr_at(step, cfg)
            for opt in self.optimizers.values():
                for group in opt.param_groups:
                    group["lr"] = lr
            sums: dict[str, torch.Tensor] = {}  # logged values stay tensors: no host sync per step
            for _ in range(cfg.grad_accum):
                x, y = next(batches)
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                with self._autocast():
                    losses = self.step_fn(x, y, step)
                keys = list(self.groups)
                for i, key in enumerate(keys):  # each loss reaches only its own optimizer's parameters
                    if losses[key].requires_grad:
                        (losses[key] / cfg.grad_accum).backward(inputs=self.groups[key], retain_graph=i < len(keys) - 1)
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + v.detach().float() / cfg.grad_accum
            for key, opt in self.optimizers.items():
                if cfg.grad_clip > 0:
                    norm = torch.nn.utils.clip_grad_norm_(self.groups[key], cfg.grad_clip)
                    sums["grad_norm" if key == "loss" else f"grad_norm_{key}"] = norm
                opt.step()
                opt.zero_grad(set_to_none=True)
            step += 1

            if bar is not None:
                bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                logged = {k: float(v) for k, v in sums.items()}
                self._log({"split": "train", "step": step, "lr": lr, "time_s": time.perf_counter() - t0, **logged})
                if bar is not None:
                    bar.set_postfix({k: f"{v:.4g}" for k, v in logged.items() if not k.startswith("grad")})
            if step % cfg.eval_every == 0 or step == cfg.steps:
                val = self.evaluate(step)
                if bar is not None:
                    bar.write(f"step {step}: " + ", ".join(f"val {k} {v:.4g}" for k, v in val.items()))
                self.save(step, batches, time.perf_counter() - t0)
        if bar is not None:
            bar.close()

        summary = {"step": step, "wall_time_s": round(time.perf_counter() - t0, 1), "device": str(self.device),
                   "parameters": sum(p.numel() for p in self.model.parameters()),
                   "val": val or self._last_val()}
        if step >= cfg.steps:
            atomic_write_json(self.run_dir / "summary.json", summary)
        return summary

    def _last_val(self) -> dict[str, Any]:
        vals = [r for r in read_metrics(self.metrics_path) if r["split"] == "val"]
        return {k: v for k, v in vals[-1].items() if k not in ("split", "step")} if vals else {}
