"""Trainer and checkpoints: exact resume, atomic files, gradient accumulation, the run folder."""

from __future__ import annotations

import json
import os

import pytest
import torch

from fastvq.models import build_model
from fastvq.models.vae import VAEConfig
from fastvq.models.vqvae import VQVAEConfig
from fastvq.train.checkpoint import atomic_write, load_checkpoint, save_checkpoint
from fastvq.train.config import TrainConfig, train_preset
from fastvq.train.data import load_dataset
from fastvq.train.images import image_grid, read_metrics
from fastvq.train.tasks import ImageTask
from fastvq.train.trainer import Trainer, lr_at

SMALL_NET = {"ch": 8, "ch_mult": (1, 2)}
SMALL_CFG = {"vqvae": VQVAEConfig.preset("tiny", **SMALL_NET, codebook_size=16, embed_dim=4),
             "vae": VAEConfig.preset("tiny", **SMALL_NET)}


def _train_cfg(**kw) -> TrainConfig:
    base = {"steps": 6, "batch_size": 8, "num_train": 40, "num_val": 8, "image_size": 16, "eval_every": 3,
            "log_every": 1, "warmup_steps": 2, "num_samples": 4, "lr": 3e-3}
    return TrainConfig.from_dict({**base, **kw})


def _trainer(name, run_dir, **kw) -> Trainer:
    cfg = _train_cfg(**kw)
    torch.manual_seed(cfg.seed)
    train, val = load_dataset(cfg.dataset, cfg.image_size, cfg.seed, num_train=cfg.num_train, num_val=cfg.num_val)
    model = build_model(name, SMALL_CFG[name].to_dict())
    return Trainer(model, ImageTask(train, val), cfg, run_dir, progress=False)


def _train_losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "train"}


@pytest.mark.parametrize("name", ["vqvae", "vae"])  # vae: its noise comes from the saved RNG state
def test_resume_continues_exactly(tmp_path, name):
    straight = tmp_path / "straight"
    _trainer(name, straight).fit()
    interrupted = tmp_path / "interrupted"
    _trainer(name, interrupted).fit(stop_at=4)  # checkpoint at step 3, then "killed" after step 4
    assert json.loads((interrupted / "checkpoint" / "state.json").read_text())["step"] == 3
    summary = _trainer(name, interrupted).fit(resume=True)
    assert summary["step"] == 6
    a, b = _train_losses(straight), _train_losses(interrupted)
    assert sorted(a) == sorted(b) == list(range(1, 7))  # step 4 was logged twice: the stale record is dropped
    for step in range(1, 7):
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])


def test_run_folder_contents(tmp_path):
    summary = _trainer("vqvae", tmp_path).fit()
    for name in ("metrics.jsonl", "loss_curve.png", "reconstructions.png", "samples.png", "summary.json",
                 "checkpoint/model-00000006.safetensors", "checkpoint/train-00000006.safetensors",
                 "checkpoint/state.json"):
        assert (tmp_path / name).is_file(), name
    val = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["split"] == "val"]
    assert [r["step"] for r in val] == [3, 6]
    for key in ("psnr", "codes_used_fraction", "perplexity", "recon", "vq", "loss"):
        assert key in val[-1]
    train = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["split"] == "train"]
    assert "codes_used" in train[-1] and "perplexity" in train[-1]
    assert summary["val"]["psnr"] == val[-1]["psnr"]
    assert not list(tmp_path.rglob("*.tmp"))  # no temporary files left behind
    assert len(list((tmp_path / "checkpoint").iterdir())) == 3  # the step-3 files are gone


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    # codebook care draws from the batch, so switch it off: the rest is deterministic
    one = _trainer("vqvae", tmp_path / "a", steps=1, batch_size=16, eval_every=100, grad_clip=0.0)
    two = _trainer("vqvae", tmp_path / "b", steps=1, batch_size=8, grad_accum=2, eval_every=100, grad_clip=0.0)
    for t in (one, two):
        t.model.quantizer.threshold_ema_dead_code = 0.0
        t.model.quantizer._initted = True  # skip the k-means init
    one.fit()
    two.fit()
    for p, q in zip(one.model.parameters(), two.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


def test_checkpoint_round_trip_and_torn_save(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    save_checkpoint(tmp_path, 7, model, {"loss": opt}, {"data": {"epoch": 1, "position": 8}, "elapsed_s": 1.0})
    expected_rng = torch.rand(3)

    model2 = torch.nn.Linear(3, 2)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=5.0)
    state = load_checkpoint(tmp_path, model2, {"loss": opt2})
    assert state["step"] == 7 and state["data"] == {"epoch": 1, "position": 8}
    assert torch.equal(torch.rand(3), expected_rng)  # the RNG state came back
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s2["param_groups"][0]["lr"] == 1e-3 and s2["param_groups"][0]["betas"] == (0.9, 0.999)
    for k in s1["state"]:
        for key in s1["state"][k]:
            assert torch.equal(s1["state"][k][key], s2["state"][k][key])

    # a save killed before its commit (state.json): the step-8 tensor files exist, step 7 still loads
    save_checkpoint(tmp_path / "other", 8, model, {"loss": opt}, {"data": {}, "elapsed_s": 0.0})
    for name in ("model-00000008.safetensors", "train-00000008.safetensors"):
        os.replace(tmp_path / "other" / name, tmp_path / name)
    assert load_checkpoint(tmp_path, model2, {"loss": opt2})["step"] == 7
    # files that record another step than state.json are refused, not mixed
    os.replace(tmp_path / "model-00000008.safetensors", tmp_path / "model-00000007.safetensors")
    with pytest.raises(RuntimeError, match="step"):
        load_checkpoint(tmp_path, model2, {"loss": opt2})
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nothing", model2, {"loss": opt2})


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    atomic_write(path, b"old")

    def boom(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write(path, b"new")
    assert path.read_bytes() == b"old" and list(tmp_path.iterdir()) == [path]


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_atomic_write_gives_the_permissions_of_open_and_leaves_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a", b"x")
        os.umask(0o077)
        atomic_write(tmp_path / "b", b"x")
        assert os.umask(0o077) == 0o077  # atomic_write did not change the process umask
    finally:
        os.umask(old)
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b").stat().st_mode & 0o777 == 0o600


def test_lr_schedule_and_presets():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0) and lr_at(100, cfg) == pytest.approx(0.1)
    assert train_preset("vqvae", "tiny").steps > 0
    with pytest.raises(ValueError, match="model must be"):
        train_preset("gan", "tiny")


def test_image_grid_layout():
    grid = image_grid(torch.zeros(10, 3, 4, 4), nrow=4, padding=1, scale=2)
    assert grid.shape == ((3 * 5 + 1) * 2, (4 * 5 + 1) * 2, 3) and grid.dtype.name == "uint8"
    assert image_grid(torch.zeros(2, 1, 4, 4), nrow=2, padding=0, scale=1).shape == (4, 8, 3)
