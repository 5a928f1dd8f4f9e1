"""The `fastvq` command end to end in a temporary folder, at a tiny size: train, resume, prior, sample."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import pytest

from fastvq.cli import build_parser, main
from fastvq.train.images import read_metrics

TINY = ["--no-progress", "--steps", "2", "--batch-size", "4", "--num-train", "16", "--num-val", "8",
        "--image-size", "16", "--eval-every", "2", "--log-every", "1", "--num-samples", "4"]
SMALL_NET = ["--ch", "8", "--ch-mult", "1", "2"]


def _subparsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def test_every_option_has_help_text():
    checked = 0
    stack = list(_subparsers(build_parser()))
    while stack:
        name, parser = stack.pop()
        stack.extend(_subparsers(parser))
        for action in parser._actions:
            if action.option_strings and not isinstance(action, argparse._HelpAction):
                assert action.help and action.help.strip(), f"{name}: {action.option_strings} has no help"
                checked += 1
    assert checked > 50


@pytest.fixture(scope="module")
def vq_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "vq"
    assert main(["train", "vqvae", "--out", str(run), *TINY, *SMALL_NET, "--codebook-size", "16"]) == 0
    return run


def test_train_vqvae_writes_a_run_folder(vq_run):
    for name in ("config.json", "metrics.jsonl", "loss_curve.png", "reconstructions.png", "samples.png",
                 "summary.json", "checkpoint/model-00000002.safetensors", "checkpoint/state.json"):
        assert (vq_run / name).is_file(), name
    config = json.loads((vq_run / "config.json").read_text())
    assert config["model"] == "vqvae" and config["model_config"]["codebook_size"] == 16
    assert config["model_config"]["ch_mult"] == [1, 2] and config["train_config"]["steps"] == 2
    summary = json.loads((vq_run / "summary.json").read_text())
    assert summary["step"] == 2 and "psnr" in summary["val"] and "codes_used_fraction" in summary["val"]


def test_resume_extends_a_finished_run(vq_run, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(vq_run, run)
    assert main(["train", "vqvae", "--resume", str(run), "--steps", "3", "--no-progress"]) == 0
    assert json.loads((run / "summary.json").read_text())["step"] == 3


def test_prior_sample_and_reconstruct(vq_run, tmp_path):
    prior = tmp_path / "prior"
    assert main(["train", "prior", "--vqvae", str(vq_run), "--out", str(prior), *TINY,
                 "--n-layer", "1", "--n-embd", "16", "--n-head", "2"]) == 0
    config = json.loads((prior / "config.json").read_text())
    assert config["model_config"]["vocab_size"] == 16 and config["model_config"]["seq_len"] == 64
    assert (prior / "samples.png").is_file()
    out = tmp_path / "s.png"
    assert main(["sample", str(prior), "--num", "4", "--out", str(out), "--top-k", "5", "--temperature", "0.9"]) == 0
    assert out.is_file()
    assert main(["reconstruct", str(vq_run), "--num", "8", "--out", str(tmp_path / "r.png")]) == 0
    assert (tmp_path / "r.png").is_file()


def test_class_conditional_prior(vq_run, tmp_path):
    prior = tmp_path / "prior"
    assert main(["train", "prior", "--vqvae", str(vq_run), "--out", str(prior), *TINY, "--class-cond",
                 "--n-layer", "1", "--n-embd", "16", "--n-head", "2"]) == 0
    assert json.loads((prior / "config.json").read_text())["model_config"]["num_classes"] == 3
    assert main(["sample", str(prior), "--num", "3", "--class-label", "2", "--out", str(tmp_path / "c.png")]) == 0


@pytest.mark.parametrize("model", ["ae", "vae", "vqgan"])
def test_train_other_models(model, tmp_path):
    extra = ["--disc-start", "1", "--disc-ndf", "8"] if model == "vqgan" else []
    assert main(["train", model, "--out", str(tmp_path / model), *TINY, *SMALL_NET, *extra]) == 0
    assert (tmp_path / model / "reconstructions.png").is_file()
    if model == "vae":
        assert main(["sample", str(tmp_path / model), "--num", "4"]) == 0
        val = json.loads((tmp_path / model / "summary.json").read_text())["val"]
        assert "elbo" in val and "kl" in val


def test_errors_are_clear(tmp_path):
    with pytest.raises(SystemExit, match="--vqvae"):
        main(["train", "prior", "--out", str(tmp_path / "p"), *TINY])
    with pytest.raises(SystemExit):
        main(["sample", str(tmp_path / "not-a-run")])


@pytest.mark.parametrize("missing", ["safetensors", "PIL"])
def test_train_without_the_train_extra_names_it(monkeypatch, tmp_path, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # what `import` sees when the package is not installed
    package = {"PIL": "Pillow"}.get(missing, missing)
    for command in (["train", "vqvae", "--out", str(tmp_path / "run")], ["sample", str(tmp_path)],
                    ["reconstruct", str(tmp_path)]):
        with pytest.raises(SystemExit, match=rf"fastvq {command[0]} needs the 'train' extra: pip install "
                                             rf"'fastvq-torch\[train\]' \(missing: {package}\)"):
            main(command)
    assert not (tmp_path / "run").exists()


def test_the_core_imports_none_of_the_train_extra():
    """`import fastvq`, the models and the `fastvq` parser work in a core install (no train extra)."""
    code = """if True:
        import sys
        extra = ("safetensors", "tqdm", "PIL", "matplotlib")
        for name in extra:
            sys.modules[name] = None  # not installed: any import of them fails
        import fastvq, fastvq.models, fastvq.train
        from fastvq.cli import build_parser
        build_parser()
        print(sorted(m for m in sys.modules if m.split(".")[0] in extra and sys.modules[m] is not None))
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_prior_needs_a_vq_run(tmp_path):
    from fastvq.models import build_model
    from fastvq.train.checkpoint import atomic_write_json, save_checkpoint

    cfg = {"ch": 8, "ch_mult": [1, 2], "in_channels": 3}
    save_checkpoint(tmp_path / "ae" / "checkpoint", 0, build_model("ae", cfg), {}, {})
    atomic_write_json(tmp_path / "ae" / "config.json", {"model": "ae", "model_config": cfg, "train_config": {}})
    with pytest.raises(SystemExit, match="'ae' run; the prior needs a vqvae or vqgan run"):
        main(["train", "prior", "--vqvae", str(tmp_path / "ae"), "--out", str(tmp_path / "p"), *TINY])
    with pytest.raises(SystemExit, match="is not a run folder"):
        main(["train", "prior", "--vqvae", str(tmp_path / "nothing"), "--out", str(tmp_path / "p"), *TINY])
    assert not (tmp_path / "p").exists()


def test_python_dash_m_fastvq_help():
    out = subprocess.run([sys.executable, "-m", "fastvq", "train", "vqvae", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "--codebook-size" in out and "--resume" in out


def test_amp_and_gradient_accumulation_flags(tmp_path):
    assert main(["train", "vqvae", "--out", str(tmp_path / "amp"), *TINY, *SMALL_NET, "--codebook-size", "16",
                 "--amp", "--grad-accum", "2"]) == 0
    summary = json.loads((tmp_path / "amp" / "summary.json").read_text())
    assert summary["step"] == 2 and summary["val"]["psnr"] > 0


def test_sigkill_then_resume_gives_the_same_losses(tmp_path):
    """Kill -9 a real training process after its first checkpoint; the resumed run's losses are the
    uninterrupted run's (wherever the kill lands, even inside a checkpoint save)."""
    # two evaluations per run, not three: the pictures and the loss curve are most of an evaluation's time
    args = ["train", "vqvae", *TINY, *SMALL_NET, "--codebook-size", "16", "--steps", "60", "--eval-every", "30"]
    assert main([*args, "--out", str(tmp_path / "straight")]) == 0
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "fastvq", *args, "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (killed / "checkpoint" / "state.json").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    assert main(["train", "vqvae", "--resume", str(killed), "--no-progress"]) == 0

    def losses(run):
        return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if r["split"] == "train"}

    a, b = losses(tmp_path / "straight"), losses(killed)
    assert sorted(a) == sorted(b) == list(range(1, 61))
    assert all(abs(a[s] - b[s]) <= 1e-6 for s in a)
