"""Drop-in replacements for quantizers of other code bases, with their names, keys and returns.

    from fastvq.compat.taming import VectorQuantizer2   # taming-transformers / latent-diffusion

Each class keeps the original's constructor, forward signature, return structure and state_dict
keys, so that changing the import line is the whole switch and existing checkpoints load with
``strict=True``; the work itself runs through fastvq's fused ops. docs/compat.md lists what still
differs and why.
"""

from fastvq.compat.taming import VectorQuantizer2

__all__ = ["VectorQuantizer2"]
