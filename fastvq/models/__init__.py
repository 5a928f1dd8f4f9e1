"""The bundled models, one file each, in the order of the journey (seed.txt):

    ae      AutoEncoder   reconstruction only
    vae     VAE           ELBO = reconstruction + KL, reparameterisation, sampling from N(0, I)
    vqvae   VQVAE         codebook (fastvq.VectorQuantizer by default) + the three loss terms
    vqgan   VQGAN         VQ-VAE + PatchGAN discriminator, hinge loss, adaptive weight
    prior   TransformerPrior  a GPT over the code indices of a trained VQ-VAE / VQ-GAN

``MODELS[name]`` is ``(ConfigClass, ModelClass)``; ``build_model(name, config_dict)`` makes one.
Each config class has named presets: ``VQVAEConfig.preset("tiny")``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from fastvq.models.autoencoder import AEConfig, AutoEncoder
from fastvq.models.config import Config
from fastvq.models.prior import PriorConfig, TransformerPrior
from fastvq.models.vae import VAE, VAEConfig
from fastvq.models.vqgan import VQGAN, VQGANConfig
from fastvq.models.vqvae import VQVAE, VQVAEConfig

MODELS: dict[str, tuple[type[Config], type[nn.Module]]] = {
    "ae": (AEConfig, AutoEncoder),
    "vae": (VAEConfig, VAE),
    "vqvae": (VQVAEConfig, VQVAE),
    "vqgan": (VQGANConfig, VQGAN),
    "prior": (PriorConfig, TransformerPrior),
}


def build_model(name: str, config: dict[str, Any] | Config) -> nn.Module:
    """The model called ``name`` (a key of MODELS) from its config or the config's dict.

    Raises:
        ValueError: unknown model name or config field.
    """
    if name not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {name!r}")
    cfg_cls, model_cls = MODELS[name]
    cfg = config if isinstance(config, cfg_cls) else cfg_cls.from_dict(dict(config))
    return model_cls(cfg)


__all__ = [
    "MODELS", "AEConfig", "AutoEncoder", "PriorConfig", "TransformerPrior", "VAE", "VAEConfig", "VQGAN", "VQGANConfig",
    "VQVAE", "VQVAEConfig", "build_model",
]
