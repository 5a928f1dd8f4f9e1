"""Checkpoints without pickle: safetensors for tensors, JSON for everything else, written atomically.

A checkpoint is a folder of three files:

    model-<step>.safetensors   the model's state_dict
    train-<step>.safetensors   optimizer tensors (``<optimizer>/<param index>/<key>``) and RNG states
    state.json                 the step (which names the two files), data position, optimizer
                               hyper-parameters, configs

Each file is written to a temporary file in the same folder, fsync'ed, then renamed into place
(``os.replace`` is atomic on POSIX and Windows), so no file is ever half written. The tensor files
carry the step in their names and go first; state.json goes last and is the commit point: until it
is renamed, it still names the previous step's files, which are deleted only afterwards. A kill at
any moment therefore leaves one complete checkpoint, the old or the new. Every file also records its
step inside, and loading checks they agree. Loading reads only safetensors and JSON: nothing is
ever unpickled. safetensors (the "train" extra) is imported where it is used, so that importing
the trainer's modules needs only the core install.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

STATE_FILE = "state.json"


def model_file(step: int) -> str:
    """Name of the model weights file of the checkpoint at ``step``."""
    return f"model-{step:08d}.safetensors"


def train_file(step: int) -> str:
    """Name of the optimizer + RNG file of the checkpoint at ``step``."""
    return f"train-{step:08d}.safetensors"


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a fsync'ed temporary file and an atomic rename.

    The file gets the permissions ``open(path, "wb")`` would give it (0o666 less the umask).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    # os.open applies the process umask to the 0o666 itself (mkstemp would make a 0o600 file, and
    # reading the umask means setting it); O_EXCL: never write into a file that is already there.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_write_json(path: Path, obj: Any) -> None:
    """``atomic_write`` of ``obj`` as indented JSON with sorted keys."""
    atomic_write(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _tensors_bytes(tensors: dict[str, Tensor], step: int) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata={"step": str(step)})


def _split_optimizer(name: str, opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, Tensor):
                tensors[f"{name}/{pid}/{key}"] = value
            else:
                scalars[f"{pid}/{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _join_optimizer(name: str, tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith(f"{name}/"):
            _, pid, field = key.split("/", 2)
            state.setdefault(int(pid), {})[field] = value
    for key, value in meta["scalars"].items():
        pid, field = key.split("/", 1)
        state.setdefault(int(pid), {})[field] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def save_checkpoint(
    folder: Path, step: int, model: torch.nn.Module, optimizers: dict[str, torch.optim.Optimizer], state: dict[str, Any]
) -> None:
    """Save model, optimizers, torch's RNG state and ``state`` (JSON-able) under ``folder``."""
    folder = Path(folder)
    train_tensors: dict[str, Tensor] = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            train_tensors[f"rng/cuda{i}"] = s
    optim_meta = {}
    for name, opt in optimizers.items():
        tensors, meta = _split_optimizer(name, opt)
        train_tensors.update(tensors)
        optim_meta[name] = meta
    atomic_write(folder / model_file(step), _tensors_bytes(model.state_dict(), step))
    atomic_write(folder / train_file(step), _tensors_bytes(train_tensors, step))
    atomic_write_json(folder / STATE_FILE, {**state, "step": step, "optimizers": optim_meta})  # the commit
    keep = {model_file(step), train_file(step), STATE_FILE}
    for old in folder.glob("*.safetensors"):
        if old.name not in keep:
            old.unlink()


def _read_tensors(path: Path) -> tuple[dict[str, Tensor], int]:
    from safetensors import safe_open
    from safetensors.torch import load

    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {str(path)!r} is missing")
    with safe_open(str(path), framework="pt") as f:
        step = int((f.metadata() or {}).get("step", -1))
    return load(path.read_bytes()), step


def read_state(folder: Path) -> dict[str, Any]:
    """state.json of the checkpoint in ``folder``."""
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint in {str(folder)!r} (missing {STATE_FILE})")
    return json.loads(path.read_text())


def load_model_weights(folder: Path, model: torch.nn.Module) -> int:
    """Load the checkpoint's model weights into ``model`` (strict); returns the step they were saved at.

    Raises:
        FileNotFoundError: no checkpoint in ``folder``.
        RuntimeError: the weights file records another step than state.json.
    """
    step = read_state(folder)["step"]
    tensors, saved_step = _read_tensors(Path(folder) / model_file(step))
    if saved_step != step:
        raise RuntimeError(f"{model_file(step)} in {str(folder)!r} records step {saved_step}, state.json {step}")
    model.load_state_dict(tensors, strict=True)
    return step


def load_checkpoint(
    folder: Path, model: torch.nn.Module, optimizers: dict[str, torch.optim.Optimizer]
) -> dict[str, Any]:
    """Restore model, optimizers and torch's RNG state; returns state.json's dict.

    Raises:
        FileNotFoundError: a checkpoint file is missing.
        RuntimeError: the files record different steps.
    """
    folder = Path(folder)
    state = read_state(folder)
    train_tensors, train_step = _read_tensors(folder / train_file(state["step"]))
    model_step = load_model_weights(folder, model)
    if not model_step == train_step == state["step"]:
        raise RuntimeError(
            f"checkpoint files in {str(folder)!r} disagree (model step {model_step}, optimizer step {train_step}, "
            f"state step {state['step']}): they were changed by hand or copied from different runs"
        )
    for name, opt in optimizers.items():
        opt.load_state_dict(_join_optimizer(name, train_tensors, state["optimizers"][name]))
    torch.set_rng_state(train_tensors["rng/torch"])
    cuda_states = [train_tensors[k] for k in sorted(train_tensors) if k.startswith("rng/cuda")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    return state
