"""The conv ResNet encoder/decoder family every bundled model shares (after taming-transformers).

    Encoder: conv_in -> [ResBlock x num_res_blocks (+ Downsample)] per level -> mid (ResBlock,
             optional self-attention, ResBlock) -> GroupNorm, SiLU, conv_out
    Decoder: the mirror image, with nearest-neighbour Upsample + conv.

``ch_mult`` has one entry per resolution level: ``len(ch_mult) - 1`` downsamplings by 2, so a
32x32 image with ch_mult (1, 2, 2) becomes an 8x8 latent. Self-attention (one head over the H*W
positions) runs only at the lowest resolution, where it is cheap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from fastvq.models.config import Config, option


@dataclass
class ConvNetConfig(Config):
    """Shape of the encoder/decoder pair (every image model's config extends this one)."""

    in_channels: int = option(3, "image channels (set from the dataset)")
    ch: int = option(32, "base channel count of the encoder/decoder")
    ch_mult: tuple[int, ...] = option((1, 2, 2), "channel multiplier per resolution level; len - 1 downsamplings by 2")
    num_res_blocks: int = option(1, "residual blocks per resolution level")
    attn: bool = option(False, "self-attention at the lowest resolution")
    dropout: float = option(0.0, "dropout inside residual blocks")


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups of at least 4 channels (the group count divides ``channels``)."""
    groups = math.gcd(channels, max(1, min(32, channels // 4)))
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResBlock(nn.Module):
    """Pre-activation residual block: (GroupNorm, SiLU, conv3x3) x 2 + skip. (B, C_in, H, W) -> (B, C_out, H, W)."""

    def __init__(self, in_ch: int, out_ch: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1, self.conv1 = group_norm(in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2, self.conv2 = group_norm(out_ch), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual. (B, C, H, W) -> same."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.norm = group_norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)  # (B, HW, C) each
        out = F.scaled_dot_product_attention(q, k, v)  # (B, HW, C)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Strided 3x3 conv: (B, C, H, W) -> (B, C, H/2, W/2)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then 3x3 conv: (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(ch: int, attn: bool, dropout: float) -> nn.Sequential:
    layers = [ResBlock(ch, ch, dropout)]
    if attn:
        layers.append(AttnBlock(ch))
    layers.append(ResBlock(ch, ch, dropout))
    return nn.Sequential(*layers)


def _levels(chans: list[int], cfg: ConvNetConfig, resample: type[nn.Module]) -> nn.Sequential:
    """``num_res_blocks`` ResBlocks per level (channels ``chans[level]``), a ``resample`` between levels."""
    layers: list[nn.Module] = []
    prev = chans[0]
    for level, ch in enumerate(chans):
        for _ in range(cfg.num_res_blocks):
            layers.append(ResBlock(prev, ch, cfg.dropout))
            prev = ch
        if level != len(chans) - 1:
            layers.append(resample(prev))
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> latent (B, out_channels, H / 2^L, W / 2^L), L = len(ch_mult) - 1."""

    def __init__(self, cfg: ConvNetConfig, out_channels: int) -> None:
        super().__init__()
        chans = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, chans[0], 3, padding=1)
        self.down = _levels(chans, cfg, Downsample)
        prev = chans[-1]
        self.mid = _mid(prev, cfg.attn, cfg.dropout)
        self.norm_out = group_norm(prev)
        self.conv_out = nn.Conv2d(prev, out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.mid(self.down(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, in_channels, h, w) -> image (B, cfg.in_channels, h * 2^L, w * 2^L)."""

    def __init__(self, cfg: ConvNetConfig, in_channels: int) -> None:
        super().__init__()
        chans = [cfg.ch * m for m in cfg.ch_mult][::-1]  # lowest resolution first
        self.conv_in = nn.Conv2d(in_channels, chans[0], 3, padding=1)
        self.mid = _mid(chans[0], cfg.attn, cfg.dropout)
        self.up = _levels(chans, cfg, Upsample)
        prev = chans[-1]
        self.norm_out = group_norm(prev)
        self.conv_out = nn.Conv2d(prev, cfg.in_channels, 3, padding=1)

    @property
    def last_layer(self) -> Tensor:
        """The final conv's weight: VQ-GAN's adaptive weight compares gradient norms here."""
        return self.conv_out.weight

    def forward(self, z: Tensor) -> Tensor:
        h = self.up(self.mid(self.conv_in(z)))
        return self.conv_out(F.silu(self.norm_out(h)))


def downsample_factor(cfg: ConvNetConfig) -> int:
    """How many image pixels one latent position covers along each axis."""
    return 2 ** (len(cfg.ch_mult) - 1)

