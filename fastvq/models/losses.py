"""VQ-GAN's losses: hinge GAN loss, the adaptive generator weight, an optional perceptual loss.

Adaptive weight (Esser et al. 2021, eq. 7): the adversarial term is scaled so that its gradient at
the decoder's last layer L has the size of the reconstruction term's,

    lambda = ||grad_L(nll)|| / (||grad_L(g)|| + 1e-4),  clamped to [0, 1e4], times disc_weight.

Perceptual loss: LPIPS-style distance on VGG16 features. Nothing is downloaded: it is used only
when the user passes a local safetensors file with torchvision's ``vgg16().features`` weights
(keys ``features.<i>.weight`` / ``.bias``; optional LPIPS linear heads ``lin<k>.weight`` of shape
(1, C_k, 1, 1)). Without it, VQ-GAN trains on pixel reconstruction + GAN loss alone.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator hinge loss: 0.5 (mean relu(1 - D(x)) + mean relu(1 + D(x^)))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: Tensor) -> Tensor:
    """Generator's adversarial loss: -mean D(x^)."""
    return -logits_fake.mean()


def adaptive_weight(nll: Tensor, g_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4) -> Tensor:
    """||d nll / d last_layer|| / (||d g_loss / d last_layer|| + 1e-4), clamped to [0, max_weight], detached."""
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()


# VGG16's conv layout (torchvision's ``features``): channel counts, "M" = max-pool
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_TAPS = (3, 8, 15, 22, 29)  # indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in features


class PerceptualLoss(nn.Module):
    """LPIPS-style perceptual distance from local VGG16 weights. (B, 3, H, W) x2 in [-1, 1] -> 0-d mean.

    Raises:
        FileNotFoundError: the weights file is missing. ValueError: it lacks VGG16 feature weights.
    """

    def __init__(self, weights_path: str | Path) -> None:
        super().__init__()
        from safetensors.torch import load_file

        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(f"perceptual_weights: no file {str(path)!r} (pass a local VGG16 safetensors)")
        layers: list[nn.Module] = []
        ch = 3
        for v in _VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(ch, v, 3, padding=1), nn.ReLU()]
                ch = v
        self.features = nn.Sequential(*layers)
        tensors = load_file(str(path))
        feats = {k[len("features."):]: v for k, v in tensors.items() if k.startswith("features.")}
        missing = set(self.features.state_dict()) - set(feats)
        if missing:
            raise ValueError(f"{str(path)!r} lacks VGG16 feature weights {sorted(missing)[:4]} ...")
        self.features.load_state_dict(feats)
        self.lins = [tensors.get(f"lin{k}.weight") for k in range(len(_TAPS))]
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> PerceptualLoss:  # frozen: always eval
        return super().train(False)

    def _taps(self, x: Tensor) -> list[Tensor]:
        h, out = ((x + 1) / 2 - self.mean) / self.std, []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in _TAPS:
                out.append(h)
            if i >= _TAPS[-1]:
                break
        return out

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        total = x.new_zeros(())
        for k, (fx, fy) in enumerate(zip(self._taps(x), self._taps(y), strict=True)):
            d = (F.normalize(fx, dim=1, eps=1e-10) - F.normalize(fy, dim=1, eps=1e-10)) ** 2  # (B, C, h, w)
            lin = self.lins[k]
            d = (d * lin.to(d)).sum(1) if lin is not None else d.sum(1)
            total = total + d.mean()
        return total
