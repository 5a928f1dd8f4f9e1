"""Loading fastvq checkpoints written before the quantizers took vector-quantize-pytorch's keys.

Those checkpoints held one codebook at the module level (``embed`` (K, D), ``ema_count`` (K,),
``ema_sum`` (K, D), ``initted``); now it lives on the ``_codebook`` submodule with a leading books
axis. ``remap_old_codebook_keys`` rewrites such a state_dict in place so old files still load.
"""

from __future__ import annotations

from typing import Any

# Codebook keys of fastvq checkpoints before the peer's keys (module level) -> their new names.
OLD_KEYS = {
    "embed": "_codebook.embed",
    "ema_count": "_codebook.cluster_size",
    "ema_sum": "_codebook.embed_avg",
    "initted": "_codebook.initted",
}


def remap_old_codebook_keys(state_dict: dict[str, Any], prefix: str) -> None:
    """Rename the old keys under ``prefix`` in ``state_dict`` (in place) to the ``_codebook`` ones.

    A key is renamed only when its new name is absent (a current checkpoint is left alone). The old
    single-codebook tensors gain the books axis: ``embed`` / ``ema_sum`` (K, D) -> (1, K, D) and
    ``ema_count`` (K,) -> (1, K); tensors that already have it are kept as they are.
    """
    for old, new in OLD_KEYS.items():
        if prefix + old in state_dict and prefix + new not in state_dict:
            value = state_dict.pop(prefix + old)
            if old in ("embed", "ema_sum") and value.dim() == 2:
                value = value.unsqueeze(0)
            if old == "ema_count" and value.dim() == 1:
                value = value.unsqueeze(0)
            state_dict[prefix + new] = value
