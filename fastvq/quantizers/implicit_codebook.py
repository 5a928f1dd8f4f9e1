"""The implicit neural codebook of QINCo (Huijben et al. 2024, https://arxiv.org/abs/2401.14732), as
vector-quantize-pytorch's ResidualVQ(implicit_neural_codebook=True) builds it.

Stage q > 0 of a residual stack does not search its stored codes c_k but codes conditioned on what
the stages before it chose, per position:

    c_k(x̂) = f(W [x̂ ; c_k] + b),   f = depth residual blocks  h -> h + Linear(SiLU(Linear(h)))

with x̂ the sum of the earlier stages' codes at that position (optionally l2-normalised after f,
for cosine codebooks). Every position therefore has its own K x D codebook: the search is dense by
nature, O(B N K D) memory and time, as the peer's.

state_dict keys are the peer's ``MLP``: ``proj_in.*``, ``layers.<i>.0.*`` and ``layers.<i>.2.*``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from fastvq.checks import check_float_tensor, positive_int


class ImplicitCodebookMLP(nn.Module):
    """The conditioning network of one QINCo stage (module docstring).

    Args:
        dim: code size D.
        dim_hidden: hidden size of each residual block. Default ``dim``.
        depth: number of residual blocks (the paper's 4, the default).
        l2norm_output: unit-normalise the produced codes (cosine codebooks). Default False.

    Raises:
        ValueError: non-positive sizes.
    """

    def __init__(self, dim: int, dim_hidden: int | None = None, depth: int = 4, l2norm_output: bool = False) -> None:
        super().__init__()
        self.dim = positive_int(dim, "dim")
        hidden = self.dim if dim_hidden is None else positive_int(dim_hidden, "dim_hidden")
        self.proj_in = nn.Linear(2 * self.dim, self.dim)
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(self.dim, hidden), nn.SiLU(), nn.Linear(hidden, self.dim))
            for _ in range(positive_int(depth, "depth"))
        )
        self.l2norm_output = bool(l2norm_output)

    def forward(self, codes: Tensor, *, condition: Tensor) -> Tensor:
        """The codes conditioned on every position's ``condition``.

        Args:
            codes: (K, D) or (H, K, D) float, the stored codes.
            condition: (B, D) or (B, ..., D) float, the sum of the earlier stages' codes per position.

        Returns:
            (B, N, K, D), or (H, B, N, K, D) for (H, K, D) codes; N is the product of condition's
            middle axes (1 for a (B, D) condition), as the peer's ``MLP``.

        Raises:
            ValueError: codes or condition of the wrong shape or size.
        """
        check_float_tensor(codes, "codes", min_dim=2)
        check_float_tensor(condition, "condition", min_dim=2)
        if codes.dim() > 3 or codes.shape[-1] != self.dim or condition.shape[-1] != self.dim:
            raise ValueError(
                f"codes must be (K, {self.dim}) or (H, K, {self.dim}) and condition (B, ..., {self.dim}), "
                f"got {tuple(codes.shape)} and {tuple(condition.shape)}"
            )
        heads = codes.unsqueeze(0) if codes.dim() == 2 else codes  # (H, K, D)
        cond = condition.reshape(condition.shape[0], -1, self.dim)  # (B, N, D)
        # W [x̂ ; c] + b split into its two halves: the (B, N, K, 2D) concatenation is never built.
        w_cond, w_code = self.proj_in.weight[:, : self.dim], self.proj_in.weight[:, self.dim :]
        from_cond = F.linear(cond, w_cond, self.proj_in.bias)  # (B, N, D)
        from_code = F.linear(heads, w_code)  # (H, K, D)
        h = from_cond[None, :, :, None, :] + from_code[:, None, None, :, :]  # (H, B, N, K, D)
        for block in self.layers:
            h = block(h) + h
        if self.l2norm_output:
            h = F.normalize(h, dim=-1)
        return h.squeeze(0) if codes.dim() == 2 else h
