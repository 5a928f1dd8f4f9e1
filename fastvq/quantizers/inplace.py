"""vector-quantize-pytorch's in-place codebook optimizer: one optimizer step on the codes inside forward.

With ``in_place_codebook_optimizer`` (a callable taking parameters, e.g. ``partial(torch.optim.SGD, lr=...)``)
a training forward first moves the (learnable) codes towards their assigned rows by one optimizer step
on mse(e, sg(z)), then quantizes again with the moved codes. Under torch.distributed the codes'
gradients are averaged over ranks before the step, so ranks keep equal codebooks.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from fastvq.distributed import all_reduce_sum_, is_distributed


def optimizer_step_(optimizer: torch.optim.Optimizer, parameters: Iterable[Tensor]) -> None:
    """Average the parameters' gradients over ranks (if distributed), step, zero the gradients."""
    if is_distributed():
        grads = [p.grad for p in parameters if p.grad is not None]
        if grads:
            all_reduce_sum_(*grads)
            for g in grads:
                g.div_(dist.get_world_size())
    optimizer.step()
    optimizer.zero_grad()


def inplace_codebook_loss_(codes: Tensor, rows: Tensor) -> Tensor:
    """Backpropagate mse(codes, sg(rows)) into the codebook now (before the step); returns it detached, 0-d.

    Args:
        codes: (..., D) the assigned codes, with their gradient path to the codebook Parameter.
        rows: (..., D) the quantized rows (only their values are used).

    Raises:
        ValueError: ``codes`` has no gradient path (the codebook is not learnable).
    """
    if not codes.requires_grad:
        raise ValueError(
            "in_place_codebook_optimizer needs a learnable codebook (learnable_codebook=True, ema_update=False)"
        )
    loss = F.mse_loss(codes.float(), rows.detach().float())
    loss.backward()
    return loss.detach()
