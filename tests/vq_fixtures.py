"""Write a VQ-GAN in either real checkpoint format, for tests: the published `vqgan.yaml` +
`vqgan.ckpt` pair and a Hugging Face Chameleon directory, with the same key names and yaml fields
as the real files (shards/vq.py loads both).

    from vq_fixtures import save_hf_format, save_original_format
    save_original_format(vq.random_vq(arch, seed=3), tmp_path)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file
from transformers import ChameleonConfig

from shards.vq import HF_PREFIX, ORIGINAL_CKPT, ORIGINAL_YAML, VQHandle
from shards.vq_arch import DDCONFIG_KEYS, hf_config


def original_yaml(arch: dict[str, Any]) -> dict[str, Any]:
    return {"model": {"target": "taming.models.vqgan.VQModel", "params": {
        "embed_dim": arch["embed_dim"], "n_embed": arch["n_embed"],
        "ddconfig": {k: arch[k] for k in DDCONFIG_KEYS},
        "lossconfig": {"target": "taming.modules.losses.vqperceptual.DummyLoss"}}}}


def save_original_format(handle: VQHandle, directory: str | Path) -> Path:
    """Write `vqgan.yaml` + `vqgan.ckpt` ({"state_dict": VQ keys + decoder.* keys})."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in handle.model.state_dict().items()}
    state.update({k: v.detach().cpu().clone() for k, v in (handle.decoder_state or {}).items()})
    (directory / ORIGINAL_YAML).write_text(yaml.safe_dump(original_yaml(handle.arch), sort_keys=False))
    torch.save({"state_dict": state}, directory / ORIGINAL_CKPT)
    return directory


def save_hf_format(handle: VQHandle, directory: str | Path) -> Path:
    """Write a Hugging Face Chameleon dir: config.json with vq_config, `model.vqmodel.*` weights."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = ChameleonConfig(vq_config=hf_config(handle.arch).to_dict(), hidden_size=64,
                             intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                             num_key_value_heads=2, vocabulary_map={"<image>": 8711})
    config.save_pretrained(directory)
    state = {HF_PREFIX + k: v.detach().cpu().contiguous().clone()
             for k, v in handle.model.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory
