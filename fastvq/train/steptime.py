"""Step time of the VQ-VAE with fastvq's quantizer against the same model with a textbook one.

    python -m fastvq.train.steptime [--batch-size 32] [--codebook-size 512 4096] [--repeats 20]

Both models share the encoder/decoder weights and the codebook; one training step (forward,
backward, AdamW) is timed, interleaving the two quantizers so that a busy machine slows both
alike; the median over ``--repeats`` is reported, with the time of the quantizer's forward +
backward alone. Prints a table: quantizer | K | step ms | quantizer ms.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fastvq.models.vqvae import VQVAE, VQVAEConfig


def _models(codebook_size: int, device: torch.device) -> dict[str, VQVAE]:
    torch.manual_seed(0)
    fast = VQVAE(VQVAEConfig.preset("tiny", codebook_size=codebook_size, quantizer="vq")).to(device)
    slow = VQVAE(VQVAEConfig.preset("tiny", codebook_size=codebook_size, quantizer="textbook")).to(device)
    slow.load_state_dict(fast.state_dict(), strict=False)
    return {"fastvq": fast, "textbook": slow}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(codebook_size: int, batch_size: int, repeats: int, device: torch.device) -> dict[str, dict[str, float]]:
    """Median step and quantizer times (ms) per quantizer, for one codebook size."""
    models = _models(codebook_size, device)
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    x = torch.rand(batch_size, 3, 32, 32, device=device) * 2 - 1
    times: dict[str, dict[str, list[float]]] = {k: {"step": [], "quantizer": []} for k in models}
    for i in range(repeats + 3):  # 3 warm-up rounds
        for name, model in models.items():
            _sync(device)
            t0 = time.perf_counter()
            loss = model.training_losses(x)["loss"]
            opts[name].zero_grad(set_to_none=True)
            loss.backward()
            opts[name].step()
            _sync(device)
            t1 = time.perf_counter()
            z = torch.randn(batch_size, model.cfg.embed_dim, 8, 8, device=device, requires_grad=True)
            q = model.quantizer(z)
            (q.quantized.square().mean() + q.loss).backward()
            _sync(device)
            t2 = time.perf_counter()
            if i >= 3:
                times[name]["step"].append(t1 - t0)
                times[name]["quantizer"].append(t2 - t1)
    return {k: {m: 1e3 * statistics.median(v) for m, v in d.items()} for k, d in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastvq.train.steptime", description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=32, help="images per step (32x32 RGB)")
    parser.add_argument("--codebook-size", type=int, nargs="+", default=[512, 4096], help="codebook sizes K")
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per quantizer")
    parser.add_argument("--device", default="cpu", help="'cpu' or 'cuda'")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print(f"VQ-VAE tiny preset, batch {args.batch_size}, device {device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print("quantizer | K | step ms | quantizer fwd+bwd ms")
    for k in args.codebook_size:
        result = measure(k, args.batch_size, args.repeats, device)
        for name, r in result.items():
            print(f"{name} | {k} | {r['step']:.1f} | {r['quantizer']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
