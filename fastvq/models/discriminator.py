"""PatchGAN discriminator (pix2pix / taming-transformers): one real-vs-fake logit per image patch.

    (B, C, H, W) -> (B, 1, h, w): conv 4x4 stride 2 + LeakyReLU, then ``n_layers - 1`` more
    stride-2 convs with GroupNorm (not BatchNorm: no dependence on the batch, nothing to go stale
    across a resume), one stride-1 conv, and a 1-channel conv giving the patch logits.
"""

from __future__ import annotations

from torch import Tensor, nn

from fastvq.models.blocks import group_norm


class PatchDiscriminator(nn.Module):
    """Images (B, in_channels, H, W) in [-1, 1] -> patch logits (B, 1, h, w)."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        ch = ndf
        for i in range(1, n_layers + 1):
            out = ndf * min(2**i, 8)
            stride = 2 if i < n_layers else 1
            layers += [nn.Conv2d(ch, out, 4, stride=stride, padding=1, bias=False), group_norm(out), nn.LeakyReLU(0.2)]
            ch = out
        layers.append(nn.Conv2d(ch, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)
        for m in self.modules():  # the DCGAN init taming uses
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
