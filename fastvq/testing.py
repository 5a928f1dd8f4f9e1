"""What "correct" means, shared by tests and benchmarks: the fp64 oracle and the contract's bound.

The numerics contract (DESIGN.md): a returned index k^ is correct when it is the fp64 argmin k*,
or when d(k^) - d(k*) <= tau with the ABSOLUTE bound
    tau = 8 u ||x|| max_k ||c_k|| + 2 sqrt(D) 2^-24 (||x||^2 + max_k ||c_k||^2),
u = 2^-11 where tf32 products are used, 0 otherwise. Never relative to d: d -> 0 as training
converges, and a relative bound would then accept anything or nothing.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

TF32_UNIT_ROUNDOFF = 2.0**-11


def distances_fp64(x: Tensor, codebook: Tensor, metric: str = "l2") -> Tensor:
    """All (N, K) distances in fp64, computed directly from the stored values.

    "l2": ||x - c||^2 from the difference (no expansion, so no cancellation).
    "cosine": 1 - cos(x, c), zero vectors having cosine 0 to everything.
    Memory is O(N K D) in fp64: for test shapes only.
    """
    x64 = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
    c64 = codebook.detach().to(torch.float64)
    if metric == "l2":
        return ((x64[:, None, :] - c64[None, :, :]) ** 2).sum(-1)
    if metric == "cosine":
        xn = x64 / x64.norm(dim=1, keepdim=True).clamp_min(1e-300)
        cn = c64 / c64.norm(dim=1, keepdim=True).clamp_min(1e-300)
        return 1.0 - xn @ cn.t()
    raise ValueError(f"metric must be 'l2' or 'cosine', got {metric!r}")


def contract_tau(x: Tensor, codebook: Tensor, metric: str = "l2", tf32: bool = False) -> Tensor:
    """Per-row absolute tolerance tau of the numerics contract, (N,) fp64.

    For "cosine" the bound is that of the unit vectors (||x|| = ||c|| = 1); since
    1 - cos = ||x^ - c^||^2 / 2 this is twice what the l2 bound alone would give, which leaves
    room for the rounding of the normalisation itself.
    """
    d = x.shape[-1]
    x64 = x.detach().reshape(-1, d).to(torch.float64)
    c64 = codebook.detach().to(torch.float64)
    u = TF32_UNIT_ROUNDOFF if tf32 else 0.0
    if metric == "cosine":
        xn = torch.ones(x64.shape[0], dtype=torch.float64, device=x64.device)
        cmax = 1.0
    else:
        xn = x64.norm(dim=1)
        cmax = c64.norm(dim=1).max().item()
    return 8 * u * xn * cmax + 2 * math.sqrt(d) * 2.0**-24 * (xn**2 + cmax**2)


def assert_contract(idx: Tensor, x: Tensor, codebook: Tensor, metric: str = "l2", tf32: bool = False) -> None:
    """Raise AssertionError naming the first rows whose index breaks the numerics contract.

    Exact ties must resolve to the lowest index: choosing a code that has a bitwise-identical
    duplicate at a lower index is wrong, whatever the distances.
    """
    dists = distances_fp64(x, codebook, metric)  # (N, K)
    flat_idx = idx.reshape(-1).to(device=dists.device, dtype=torch.int64)
    if flat_idx.shape[0] != dists.shape[0]:
        raise AssertionError(f"idx has {flat_idx.shape[0]} entries, x has {dists.shape[0]} rows")
    if flat_idx.numel() == 0:
        return
    if (flat_idx < 0).any() or (flat_idx >= codebook.shape[0]).any():
        raise AssertionError(f"indices out of range [0, {codebook.shape[0]}): {flat_idx.unique()[:10]}")
    d_best = dists.min(dim=1).values
    d_got = dists.gather(1, flat_idx[:, None]).squeeze(1)
    tau = contract_tau(x, codebook, metric, tf32)
    excess = d_got - d_best
    bad = excess > tau
    # The exact-tie rule: a duplicate of the chosen code (bitwise equal row) at a lower index.
    chosen_rows = codebook.detach()[flat_idx.to(codebook.device)]  # (N, D)
    same = (codebook.detach()[None, :, :] == chosen_rows[:, None, :]).all(-1).to(dists.device)  # (N, K)
    cols = torch.arange(dists.shape[1], device=dists.device)
    bad |= (same & (cols[None, :] < flat_idx[:, None])).any(dim=1)
    if bad.any():
        rows = bad.nonzero().flatten()[:5].tolist()
        detail = ", ".join(
            f"row {r}: got {flat_idx[r].item()} (d={d_got[r].item():.6g}), "
            f"best {dists[r].argmin().item()} (d={d_best[r].item():.6g}), tau={tau[r].item():.3g}"
            for r in rows
        )
        raise AssertionError(f"{int(bad.sum())} rows break the numerics contract: {detail}")


def vq_reference_fp64(z: Tensor, codebook: Tensor, idx: Tensor, commitment_weight: float, codebook_weight: float):
    """fp64 loss and its gradients for given indices, through autograd on the textbook formula.

    Returns (loss, grad_z, grad_codebook) for an upstream gradient of 1 on the loss and of
    ``grad_zq`` = 0 on zq (add the straight-through part yourself).
    """
    z64 = z.detach().reshape(-1, z.shape[-1]).to(torch.float64).requires_grad_(True)
    c64 = codebook.detach().to(torch.float64).requires_grad_(True)
    e = c64[idx.reshape(-1)]
    loss = codebook_weight * ((z64.detach() - e) ** 2).mean() + commitment_weight * ((z64 - e.detach()) ** 2).mean()
    gz, gc = torch.autograd.grad(loss, (z64, c64))
    return loss.detach(), gz, gc


def contract_excess(
    idx: Tensor, x: Tensor, codebook: Tensor, metric: str = "l2", tf32: bool = False, chunk_bytes: int = 2**27
) -> Tensor:
    """Per-row (d(k^) - d(k*)) / tau of the numerics contract, (N,) fp64: <= 1 passes, 0 is the fp64 argmin.

    The same test as ``assert_contract``, as a number per row instead of a raise (so a report can
    say by how much a row misses), with +inf for an index outside [0, K) or an exact-tie violation
    (a bitwise-equal code at a lower index). Rows are taken in chunks so that the (rows, K, D) fp64
    oracle stays under ``chunk_bytes``: any N fits, at O(N K D) time.
    """
    d = x.shape[-1]
    k = codebook.shape[0]
    xs = x.detach().reshape(-1, d)
    flat_idx = idx.reshape(-1).to(device=xs.device, dtype=torch.int64)
    if flat_idx.shape[0] != xs.shape[0]:
        raise ValueError(f"idx has {flat_idx.shape[0]} entries, x has {xs.shape[0]} rows")
    out = torch.full((xs.shape[0],), float("inf"), dtype=torch.float64, device=xs.device)
    cb = codebook.detach()
    rows = max(1, chunk_bytes // (8 * k * d))
    cols = torch.arange(k, device=xs.device)
    for start in range(0, xs.shape[0], rows):
        xc, ic = xs[start : start + rows], flat_idx[start : start + rows]
        ok = (ic >= 0) & (ic < k)
        ic = ic.clamp(0, k - 1)
        dists = distances_fp64(xc, cb, metric)  # (rows, K)
        excess = (dists.gather(1, ic[:, None]).squeeze(1) - dists.min(dim=1).values).clamp_min(0.0)
        tau = contract_tau(xc, cb, metric, tf32)
        # 0 / 0 (a zero tau and an exact argmin) is a pass; anything over a zero tau is not.
        ratio = torch.where(excess > 0, excess / tau, torch.zeros_like(excess))
        same = (cb[None, :, :] == cb[ic][:, None, :]).all(-1)  # (rows, K): bitwise duplicates of the choice
        tie_broken = (same & (cols[None, :] < ic[:, None])).any(dim=1)
        out[start : start + rows] = torch.where(ok & ~tie_broken, ratio, float("inf"))
    return out
