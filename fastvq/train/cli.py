"""``fastvq train {ae,vae,vqvae,vqgan,prior}``, ``fastvq sample`` and ``fastvq reconstruct``.

Every config field becomes a flag (``--codebook-size 256``, ``--no-attn``) with the field's help
text; a flag given on the command line overrides the ``--preset`` (default "tiny", sized for a CPU).
Each run writes into runs/<model>-<YYYYmmdd-HHMMSS>/ unless --out names a folder.

This is where errors become exits: the library raises ValueError / FileNotFoundError, and these
commands turn the ones a user can fix into one line, ``error: ...``, instead of a traceback. They
also check first that the "train" extra is installed (the library imports its packages only where
it uses them), so that a core install gets a message naming the extra, not a failed import.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from fastvq.models import MODELS
from fastvq.models.config import Config
from fastvq.train.checkpoint import atomic_write_json
from fastvq.train.config import TrainConfig, train_preset
from fastvq.train.data import load_dataset, load_folder, to_float
from fastvq.train.images import reconstruction_grid, save_grid
from fastvq.train.runs import load_run, prepare_run, read_run_config
from fastvq.train.trainer import Trainer

TRAINABLE = ("ae", "vae", "vqvae", "vqgan", "prior")
# setup.py's "train" extra: {import name: package name}
TRAIN_EXTRA = {"safetensors": "safetensors", "tqdm": "tqdm", "PIL": "Pillow", "matplotlib": "matplotlib"}


def require_train_extra(command: str) -> None:
    """Exit with a message naming the "train" extra when one of its packages is not installed."""
    missing = [package for module, package in TRAIN_EXTRA.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise SystemExit(f"error: {command} needs the 'train' extra: pip install 'fastvq-torch[train]' "
                         f"(missing: {', '.join(missing)})")


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn the errors a user can fix (bad options, a missing or wrong run folder) into ``error: ...`` exits."""
    try:
        yield
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from err


# -- config <-> flags ---------------------------------------------------------------------------


def _add_config_flags(parser: argparse.ArgumentParser, cfg_cls: type[Config], shown: Config, title: str) -> None:
    group = parser.add_argument_group(title)
    for f in dataclasses.fields(cfg_cls):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(shown, f.name)
        help_text = f"{f.metadata.get('help', '')} (tiny preset: {json.dumps(default)})"
        if isinstance(default, bool):
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif isinstance(default, tuple):
            group.add_argument(flag, dest=f.name, type=int, nargs="+", default=None, metavar="N", help=help_text)
        elif isinstance(default, dict):
            group.add_argument(flag, dest=f.name, type=json.loads, default=None, metavar="JSON", help=help_text)
        else:
            group.add_argument(flag, dest=f.name, type=type(default), default=None, help=help_text)


def _given(args: argparse.Namespace, cfg_cls: type[Config]) -> dict[str, Any]:
    """The fields of ``cfg_cls`` that were set on the command line."""
    names = (f.name for f in dataclasses.fields(cfg_cls))
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def new_run_dir(model: str, root: str = "runs") -> Path:
    """A folder name under ``root`` that does not exist yet: <model>-<YYYYmmdd-HHMMSS>[-i]."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, i = Path(root) / f"{model}-{stamp}", 1
    while path.exists():
        path, i = Path(root) / f"{model}-{stamp}-{i}", i + 1
    return path


# -- train ----------------------------------------------------------------------------------------


def run_train(args: argparse.Namespace) -> int:
    """``fastvq train MODEL``: a new run (or ``--resume RUN``) trained to its last step."""
    require_train_extra("fastvq train")
    name = args.model
    cfg_cls, _ = MODELS[name]
    if name == "prior" and not (args.vqvae or args.resume):
        raise SystemExit("error: fastvq train prior needs --vqvae RUN (a trained vqvae or vqgan run folder)")
    with user_errors():
        if args.resume:
            run_dir = Path(args.resume)
            saved = read_run_config(run_dir)
            if saved["model"] != name:
                raise SystemExit(f"error: {str(run_dir)!r} is a {saved['model']!r} run, not {name!r}")
            overrides = {k: v for k, v in _given(args, TrainConfig).items() if k in ("steps", "device")}
            train_cfg = TrainConfig.from_dict({**saved["train_config"], **overrides})
            model_cfg = cfg_cls.from_dict(saved["model_config"])
            extra = {k: v for k, v in saved.items() if k not in ("model", "model_config", "train_config")}
        else:
            run_dir = Path(args.out) if args.out else new_run_dir(name)
            model_cfg = cfg_cls.preset(args.preset, **_given(args, cfg_cls))
            train_cfg = train_preset(name, args.preset, **_given(args, TrainConfig))
            extra = {"vqvae_run": str(Path(args.vqvae).resolve())} if name == "prior" else {}
        torch.manual_seed(train_cfg.seed)
        model, task, model_cfg = prepare_run(name, model_cfg, train_cfg, extra)
    if not args.resume:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / "config.json", {"model": name, "model_config": model_cfg.to_dict(),
                                                    "train_config": train_cfg.to_dict(), **extra})
    print(f"fastvq train {name}: {sum(p.numel() for p in model.parameters()):,} parameters, run folder {run_dir}")
    summary = Trainer(model, task, train_cfg, run_dir, progress=not args.no_progress).fit(resume=bool(args.resume))
    print(json.dumps(summary, indent=2))
    return 0


def _add_train_parser(sub: Any) -> None:
    train = sub.add_parser("train", help="train a model; writes a run folder",
                           description="Train one of the bundled models. Flags override the --preset.")
    models = train.add_subparsers(dest="model", required=True, metavar="MODEL")
    descriptions = {
        "ae": "autoencoder (reconstruction)",
        "vae": "variational autoencoder (ELBO)",
        "vqvae": "VQ-VAE with fastvq's quantizer (the main job)",
        "vqgan": "VQ-GAN (VQ-VAE + discriminator)",
        "prior": "transformer prior over the codes of a trained VQ-VAE / VQ-GAN run (--vqvae RUN)",
    }
    for name in TRAINABLE:
        p = models.add_parser(name, help=descriptions[name], description=f"Train the {descriptions[name]}.")
        p.add_argument("--preset", default="tiny", choices=("tiny", "base"),
                       help="named size: 'tiny' (default) for a CPU in minutes, 'base' for a GPU")
        p.add_argument("--out", default=None, help="run folder (default: runs/<model>-<timestamp>)")
        p.add_argument("--resume", default=None, metavar="RUN",
                       help="continue the run in this folder from its checkpoint, exactly where it stopped")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        if name == "prior":
            p.add_argument("--vqvae", default=None, metavar="RUN", help="run folder of the trained vqvae / vqgan")
        cfg_cls, _ = MODELS[name]
        _add_config_flags(p, cfg_cls, cfg_cls.preset("tiny"), f"{name} model options")
        _add_config_flags(p, TrainConfig, train_preset(name, "tiny"), "training options")
        p.set_defaults(func=run_train)


# -- sample / reconstruct -------------------------------------------------------------------------


def run_sample(args: argparse.Namespace) -> int:
    """``fastvq sample RUN``: a grid of new images from a trained prior or VAE."""
    require_train_extra("fastvq sample")
    with user_errors():
        model, saved = load_run(args.run, device=args.device)
    g = torch.Generator().manual_seed(args.seed)
    if saved["model"] == "prior":
        images = model.generate_images(args.num, generator=g, temperature=args.temperature, top_k=args.top_k,
                                       top_p=args.top_p, class_label=args.class_label)
    elif hasattr(model, "sample"):
        images = model.sample(args.num, saved["train_config"]["image_size"], generator=g)
    else:
        raise SystemExit(f"error: a {saved['model']!r} model cannot sample (train a vae, or a prior over a vqvae)")
    out = Path(args.out) if args.out else Path(args.run) / "samples.png"
    save_grid(out, images.float().cpu(), nrow=args.nrow)
    print(f"wrote {args.num} samples to {out}")
    return 0


def run_reconstruct(args: argparse.Namespace) -> int:
    """``fastvq reconstruct RUN``: images beside their reconstructions by a trained image model, and the PSNR."""
    require_train_extra("fastvq reconstruct")
    with user_errors():
        model, saved = load_run(args.run, device=args.device)
    if saved["model"] == "prior":
        raise SystemExit("error: reconstruct takes an image model's run (ae, vae, vqvae, vqgan), not a prior")
    tc = saved["train_config"]
    with user_errors():  # a missing folder, or an unreadable image in it
        if args.images:
            images = load_folder(args.images, tc["image_size"])[0][: args.num]
        else:
            images = load_dataset(tc["dataset"], tc["image_size"], tc["seed"], num_train=0,
                                  num_val=args.num)[1].images
    x = to_float(images[: args.num]).to(next(model.parameters()).device)
    with torch.no_grad():
        x_hat = model.reconstruct(x).float()
    out = Path(args.out) if args.out else Path(args.run) / "reconstruct.png"
    nrow = min(args.nrow, x.shape[0])
    save_grid(out, reconstruction_grid(x.cpu(), x_hat.cpu(), nrow=nrow), nrow=nrow)
    mse = float(((x_hat.clamp(-1, 1) - x) ** 2).mean())
    psnr = 10 * torch.log10(torch.tensor(4 / max(mse, 1e-10)))
    print(f"wrote {x.shape[0]} images and their reconstructions to {out} (PSNR {psnr:.2f} dB)")
    return 0


def add_parser(sub: Any) -> None:
    """Register train, sample and reconstruct on the `fastvq` command's subparsers."""
    _add_train_parser(sub)

    p = sub.add_parser("sample", help="new images from a trained prior (or VAE) run",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run", help="run folder of a prior (codes -> decoded by its VQ model), vae or vqvae")
    p.add_argument("--num", type=int, default=64, help="number of images")
    p.add_argument("--nrow", type=int, default=8, help="images per grid row")
    p.add_argument("--out", default=None, help="PNG file (default: RUN/samples.png)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--temperature", type=float, default=1.0, help="prior only: softmax temperature")
    p.add_argument("--top-k", type=int, default=0, help="prior only: keep the k most likely codes (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="prior only: nucleus sampling mass (1: off)")
    p.add_argument("--class-label", type=int, default=None, help="prior only: class to condition on")
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda'")
    p.set_defaults(func=run_sample)

    p = sub.add_parser("reconstruct", help="reconstruct images with a trained image model run",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run", help="run folder of an ae, vae, vqvae or vqgan")
    p.add_argument("--images", default=None, help="folder of images (default: the run's validation images)")
    p.add_argument("--num", type=int, default=32, help="number of images")
    p.add_argument("--nrow", type=int, default=8, help="images per grid row")
    p.add_argument("--out", default=None, help="PNG file (default: RUN/reconstruct.png)")
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda'")
    p.set_defaults(func=run_reconstruct)
