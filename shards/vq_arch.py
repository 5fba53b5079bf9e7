"""Chameleon's VQ-GAN architecture: its fields (original yaml names), the transformers config for
them, and the strict state-dict check every VQ weight loader (encoder and decoder) uses.

    from shards.vq_arch import FULL_ARCH, hf_config, check_state
    config = hf_config(FULL_ARCH)              # transformers ChameleonVQVAEConfig
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.errors import DataError

MAX_CODES = 1 << 16  # codes are stored as uint16

# Original-release yaml field names (model.params.ddconfig) of Chameleon's VQ-GAN.
FULL_ARCH: dict[str, Any] = {
    "embed_dim": 256, "n_embed": 8192, "double_z": False, "z_channels": 256, "resolution": 512,
    "in_channels": 3, "out_ch": 3, "ch": 128, "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2,
    "attn_resolutions": [], "dropout": 0.0,
}
# Reduced width for CPU demos and tests: same codebook, grid and latent size, 1/4 the channels.
SMALL_ARCH: dict[str, Any] = {**FULL_ARCH, "ch": 32, "num_res_blocks": 1}
RANDOM_ARCHS = {"full": FULL_ARCH, "small": SMALL_ARCH}
DDCONFIG_KEYS = ("double_z", "z_channels", "resolution", "in_channels", "out_ch", "ch", "ch_mult",
                 "num_res_blocks", "attn_resolutions", "dropout")


class CheckpointError(DataError):
    """A VQ-GAN checkpoint is missing, unreadable, or does not match its architecture."""


def hf_config(arch: dict[str, Any]):
    """The transformers `ChameleonVQVAEConfig` for an architecture in original yaml names."""
    # transformers: seconds to import, only loading a model needs it
    from transformers import ChameleonVQVAEConfig
    return ChameleonVQVAEConfig(
        embed_dim=arch["embed_dim"], num_embeddings=arch["n_embed"], double_latent=arch["double_z"],
        latent_channels=arch["z_channels"], resolution=arch["resolution"],
        in_channels=arch["in_channels"], base_channels=arch["ch"],
        channel_multiplier=list(arch["ch_mult"]), num_res_blocks=arch["num_res_blocks"],
        attn_resolutions=list(arch["attn_resolutions"]) or None, dropout=arch["dropout"],
        attn_type="vanilla")


def arch_from_hf(vq: dict[str, Any]) -> dict[str, Any]:
    """Original yaml names from a transformers `vq_config` dict (config.json)."""
    keys = {"embed_dim": "embed_dim", "n_embed": "num_embeddings", "double_z": "double_latent",
            "z_channels": "latent_channels", "resolution": "resolution",
            "in_channels": "in_channels", "ch": "base_channels", "ch_mult": "channel_multiplier",
            "num_res_blocks": "num_res_blocks", "attn_resolutions": "attn_resolutions",
            "dropout": "dropout"}
    arch = {k: vq.get(hf, FULL_ARCH[k]) for k, hf in keys.items()}
    arch["attn_resolutions"] = list(arch["attn_resolutions"] or [])
    arch["ch_mult"] = list(arch["ch_mult"])
    arch["out_ch"] = arch["in_channels"]
    return checked_arch(arch, "config.json vq_config")


def checked_arch(arch: dict[str, Any], where: str) -> dict[str, Any]:
    if not 2 <= arch["n_embed"] <= MAX_CODES:
        raise CheckpointError(f"codebook size n_embed={arch['n_embed']} is not storable as uint16 "
                              f"(must be 2..{MAX_CODES})", file=where)
    if arch["ch"] % 32:
        raise CheckpointError(f"base channels ch={arch['ch']} must be a multiple of 32 "
                              "(GroupNorm with 32 groups)", file=where)
    return arch


def check_state(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], what: str,
                *, where: str) -> None:
    """Raise unless `state` has exactly the `expected` keys with exactly their shapes."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{what} keys do not match the architecture: missing "
                              f"{preview(missing)}; unexpected {preview(unexpected)}", file=where)
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {s}"
              for k, s in expected.items() if tuple(state[k].shape) != s]
    if shapes:
        raise CheckpointError(f"{what} weight shapes do not match the config: {preview(shapes)}",
                              file=where)


def preview(items: list[str], limit: int = 8) -> str:
    if not items:
        return "none"
    more = f" ... (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more
