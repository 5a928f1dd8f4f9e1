"""Transformer prior: a small GPT that predicts a trained VQ model's code indices one by one.

An image's (h, w) code grid is read in raster order into a sequence of T = h*w tokens. The model
sees a start token first, the class token when conditioning on a class, then predicts
p(c_t | c_<t) with causal self-attention (after nanoGPT). Sampling starts from the start token
and draws one code at a time, with temperature, top-k and top-p (nucleus) filtering; with
``use_cache=True`` each step feeds only the newest token and reuses the keys and values of the
earlier ones (the KV cache), which gives the same logits as recomputing the whole prefix.

Vocabulary: codes 0..K-1, then the start token K, then class tokens K+1..K+num_classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastvq.models.config import Config, option


@dataclass
class PriorConfig(Config):
    vocab_size: int = option(128, "number of codes K of the VQ model (set from it)")
    seq_len: int = option(64, "codes per image, h * w (set from the VQ model)")
    num_classes: int = option(0, "number of classes (set from the dataset when class_cond)")
    class_cond: bool = option(False, "condition on the dataset's class labels")
    n_layer: int = option(4, "transformer blocks")
    n_head: int = option(4, "attention heads")
    n_embd: int = option(128, "embedding width")
    dropout: float = option(0.0, "dropout on attention and MLP outputs")

    PRESETS = {"tiny": {}, "base": {"n_layer": 8, "n_head": 8, "n_embd": 512, "dropout": 0.1}}


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with an optional KV cache. (B, T, C) -> (B, T, C)."""

    def __init__(self, cfg: PriorConfig) -> None:
        super().__init__()
        if cfg.n_embd % cfg.n_head:
            raise ValueError(f"n_embd ({cfg.n_embd}) must be divisible by n_head ({cfg.n_head})")
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.dropout = cfg.dropout

    def forward(self, x: Tensor, cache: dict[str, Tensor] | None = None) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (a.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for a in (q, k, v))  # (B, nh, T, hs)
        if cache is not None:
            if "k" in cache:  # earlier positions: prepend their keys/values
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        # with a cache, the t new queries are the last t positions: causal within them, full before them
        past = k.shape[2] - t
        mask = torch.ones(t, k.shape[2], dtype=torch.bool, device=x.device).tril(diagonal=past)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return F.dropout(self.proj(y.transpose(1, 2).reshape(b, t, c)), self.dropout, self.training)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: PriorConfig) -> None:
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(cfg.n_embd), CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.n_embd, 4 * cfg.n_embd),
            nn.GELU(),
            nn.Linear(4 * cfg.n_embd, cfg.n_embd),
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x: Tensor, cache: dict[str, Tensor] | None = None) -> Tensor:
        x = x + self.attn(self.ln1(x), cache)
        return x + self.mlp(self.ln2(x))


class TransformerPrior(nn.Module):
    """GPT over code sequences. codes (B, T) int64 in [0, vocab_size) -> logits (B, T, vocab_size)."""

    name = "prior"

    def __init__(self, cfg: PriorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        n_prefix = 2 if cfg.class_cond else 1  # start token (+ class token)
        self.n_prefix = n_prefix
        self.tok_emb = nn.Embedding(cfg.vocab_size + 1 + cfg.num_classes, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.seq_len + n_prefix, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.apply(self._init)
        self.vq: nn.Module | None = None  # decodes codes to images; attach_vq keeps it out of the weights

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def attach_vq(self, vq: nn.Module) -> None:
        """Attach the (trained, frozen) VQ model whose codes this prior models, without registering it."""
        object.__setattr__(self, "vq", vq)

    def prefix(self, batch: int, labels: Tensor | None, device: torch.device) -> Tensor:
        """(B, n_prefix) int64: the start token, then the class token when conditioning."""
        start = torch.full((batch, 1), self.cfg.vocab_size, dtype=torch.long, device=device)
        if not self.cfg.class_cond:
            return start
        if labels is None:
            raise ValueError("this prior is class-conditional: pass class labels")
        return torch.cat([start, (self.cfg.vocab_size + 1 + labels.long()).view(-1, 1).to(device)], dim=1)

    def forward(self, tokens: Tensor, offset: int = 0, caches: list[dict[str, Tensor]] | None = None) -> Tensor:
        """tokens (B, t) -> logits (B, t, vocab_size); ``offset``: position of tokens[:, 0] (with a cache)."""
        pos = torch.arange(offset, offset + tokens.shape[1], device=tokens.device)
        x = self.drop(self.tok_emb(tokens) + self.pos_emb(pos))  # (B, t, C)
        for i, block in enumerate(self.blocks):
            x = block(x, None if caches is None else caches[i])
        return self.head(self.ln_f(x))

    def training_losses(self, codes: Tensor, y: Tensor | None = None, step: int = 0) -> dict[str, Tensor]:
        """codes (B, h, w) or (B, T) int64 -> "loss" (mean cross-entropy, nats/code) and "bits_per_code"."""
        codes = codes.reshape(codes.shape[0], -1)
        tokens = torch.cat([self.prefix(codes.shape[0], y, codes.device), codes[:, :-1]], dim=1)  # (B, n_prefix+T-1)
        logits = self(tokens)[:, self.n_prefix - 1 :]  # (B, T, K): position i predicts codes[:, i]
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), codes.reshape(-1))
        return {"loss": loss, "bits_per_code": loss.detach() / 0.6931471805599453}

    def optim_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"loss": list(self.parameters())}

    @torch.no_grad()
    def generate(
        self, n: int, *, generator: torch.Generator | None = None, temperature: float = 1.0, top_k: int = 0,
        top_p: float = 1.0, labels: Tensor | None = None, use_cache: bool = True,
    ) -> Tensor:
        """Sample ``n`` code sequences: (n, seq_len) int64.

        Random draws come from ``generator`` (a CPU torch.Generator) so that a seed fixes the result;
        ``use_cache=False`` recomputes the whole prefix at every step (the reference for the cache).
        """
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        device = self.head.weight.device
        seq = self.prefix(n, labels, device)  # (n, n_prefix)
        caches = [{} for _ in self.blocks] if use_cache else None
        logits = self(seq, 0, caches)[:, -1]
        for t in range(self.cfg.seq_len):
            probs = F.softmax(filter_logits(logits.float() / temperature, top_k, top_p), dim=-1)
            nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(device)  # (n, 1)
            seq = torch.cat([seq, nxt], dim=1)
            if t == self.cfg.seq_len - 1:
                break
            logits = (self(nxt, seq.shape[1] - 1, caches) if use_cache else self(seq))[:, -1]
        return seq[:, self.n_prefix :]

    @torch.no_grad()
    def generate_images(self, n: int, class_label: int | None = None, **kwargs) -> Tensor:
        """Sample codes and decode them with the attached VQ model: (n, C, H, W) in about [-1, 1]."""
        if self.vq is None:
            raise RuntimeError("no VQ model attached (prior.vq); load the prior with fastvq.train.runs.load_run")
        labels = None
        if self.cfg.class_cond:
            labels = torch.full((n,), 0 if class_label is None else class_label, dtype=torch.long)
            if class_label is None:
                labels = torch.arange(n) % self.cfg.num_classes
        codes = self.generate(n, labels=labels, **kwargs)
        side = int(round(self.cfg.seq_len**0.5))
        return self.vq.decode_indices(codes.view(n, side, side))


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Set to -inf the logits outside the top-k and outside the smallest set with mass >= top_p. (B, V) -> (B, V)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = F.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cum - F.softmax(sorted_logits, dim=-1) >= top_p  # mass before this token already reaches top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return logits
