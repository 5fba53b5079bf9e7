"""RynnModel: transformers' `ChameleonModel` backbone + the project's output projection + the
action head. Logits are computed only at supervised positions.

transformers' `ChameleonForConditionalGeneration` forces every image-token logit to the minimum
float (it is a text generator), so image CE through it would be infinite: this model owns
`lm_head`. The backbone's VQ model is dead weight with pretokenized data and is not built.
The forward pass returns what the loss needs (`Outputs`); trainer/loss.py computes the terms.

    model = RynnModel(PRESETS["tiny"], chunk=5, action_dim=7)
    out = model(batch)              # Outputs: supervised logits and targets, the head's actions
    terms = Loss(train_cfg.loss)(out, batch)       # {"loss", "ce_action", "ce_image", "l1"}

Inference (SPEC.md 8), the same mask as training:
    model = trainer.checkpoint.load_model(Path("runs/demo/step-000300"))
    actions = model.predict_chunk(prompt_plus_action_start)      # continuous: (1, K, D)
Token-by-token decoding with a KV cache lives in trainer/policy.py (Stepper, Backend).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import ChameleonConfig, ChameleonModel

from pipeline.errors import RynnError
from shards import vocab
from trainer.config import ModelConfig
from trainer.head import ActionHead
from trainer.mask import attention_mask_4d

# The smallest VQ config transformers accepts: built, then dropped (pretokenized data needs none).
_STUB_VQ = {"base_channels": 32, "channel_multiplier": [1], "num_res_blocks": 1, "embed_dim": 8,
            "latent_channels": 32, "num_embeddings": vocab.CODEBOOK_SIZE}
IMAGE_TOKEN = 8711  # Chameleon's "<image>" placeholder id (the config requires a vocabulary map)


def chameleon_config(cfg: ModelConfig) -> ChameleonConfig:
    return ChameleonConfig(
        vocab_size=vocab.VOCAB_SIZE, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads, max_position_embeddings=cfg.max_positions,
        attention_dropout=cfg.residual_dropout, vq_config=_STUB_VQ,
        vocabulary_map={"<image>": IMAGE_TOKEN}, bos_token_id=vocab.BOS, pad_token_id=None,
        rms_norm_eps=cfg.rms_norm_eps, swin_norm=cfg.swin_norm, hidden_act=cfg.hidden_act,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        attn_implementation="sdpa")


_INIT_STD = 0.02      # ChameleonConfig.initializer_range: the std of every embedding row
_FREQUENCIES = 8      # ordinal_rows: frequencies from 1 to 32 half-turns over the bin range


def ordinal_rows(n: int, width: int, *, std: float) -> torch.Tensor:
    """(n, width) embedding rows that vary smoothly with the row index: a random mix of
    cos / sin(pi f t), t = index / (n - 1), over `_FREQUENCIES` geometric frequencies f in 1..32.
    Each entry has variance std**2, as a random N(0, std) row; rows i and i+1 are close (cosine
    similarity ~0.99 for n = 256), rows far apart nearly orthogonal. Draws from torch's RNG."""
    t = torch.arange(n, dtype=torch.float64) / max(n - 1, 1)
    f = torch.logspace(0, 5, _FREQUENCIES, base=2, dtype=torch.float64)
    phase = torch.pi * t[:, None] * f[None]                                # (n, F)
    basis = torch.cat([phase.cos(), phase.sin()], 1) / _FREQUENCIES ** 0.5   # (n, 2F)
    mix = torch.randn(2 * _FREQUENCIES, width, dtype=torch.float64) * std
    return (basis @ mix).float()


class Outputs(NamedTuple):
    """One forward pass (a NamedTuple, so DDP and FSDP find its tensors)."""

    logits: torch.Tensor          # (N, V) at the N supervised positions
    targets: torch.Tensor         # (N,) their target ids
    token_is_vla: torch.Tensor    # (N,) bool: the position is in a VLA row
    actions: torch.Tensor         # (R, K, D) the head on the R VLA rows; none: (1, K, D) idle
    vla_rows: torch.Tensor        # (B,) bool


class RynnModel(nn.Module):
    def __init__(self, cfg: ModelConfig, *, chunk: int, action_dim: int) -> None:
        super().__init__()
        self.cfg, self.chunk, self.action_dim = cfg, chunk, action_dim
        self.backbone = ChameleonModel(chameleon_config(cfg))
        del self.backbone.vqmodel
        self.backbone.vqmodel = None
        if cfg.gradient_checkpointing:
            self.backbone.gradient_checkpointing_enable()
        self.lm_head = nn.Linear(cfg.hidden, vocab.VOCAB_SIZE, bias=False)
        self.action_head = ActionHead(hidden=cfg.hidden, chunk=chunk, action_dim=action_dim,
                                      width=cfg.head_width, heads=cfg.head_heads,
                                      layers=cfg.head_layers, ffn=cfg.head_ffn,
                                      dropout=cfg.head_dropout)
        if cfg.bin_init == "ordinal":
            embed = self.backbone.embed_tokens.weight
            with torch.no_grad():
                for base in (vocab.STATE_BIN_BASE, vocab.ACTION_BIN_BASE):
                    rows = slice(base + 1, base + vocab.NUM_BINS + 1)
                    embed[rows] = ordinal_rows(vocab.NUM_BINS, cfg.hidden, std=_INIT_STD).to(embed)

    # -- forward pieces

    def hidden(self, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Final hidden states (after the final norm) under the SPEC.md 7 mask."""
        dtype = self.lm_head.weight.dtype
        mask = attention_mask_4d(ids, valid, dtype=torch.float32).to(dtype)
        pos = torch.arange(ids.shape[1], device=ids.device)[None].expand_as(ids)
        return self.backbone(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state

    def head_context(self, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Positions before the first action block of each row (and not padding)."""
        pos = torch.arange(ids.shape[1], device=ids.device)[None]
        is_start = ids == vocab.ACTION_START
        first = torch.where(is_start.any(1), is_start.float().argmax(1),
                            torch.full_like(is_start[:, 0], ids.shape[1], dtype=torch.long))
        return (pos < first[:, None]) & valid.bool()

    def forward(self, batch: dict) -> Outputs:
        """Reader batch -> the logits at supervised positions and the head's actions."""
        ids, labels = batch["input_ids"], batch["labels"]
        valid = batch["attention_mask"].bool()
        h = self.hidden(ids, valid)
        logits, targets, token_is_vla = self.supervised_logits(h, labels, batch["is_vla"])
        rows = batch["is_vla"].bool()
        return Outputs(logits, targets, token_is_vla, self.head_on_rows(h, ids, valid, rows), rows)

    def supervised_logits(self, h: torch.Tensor, labels: torch.Tensor, is_vla: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits, targets, in a VLA row) at the positions whose next token is supervised."""
        target = labels[:, 1:]
        sel = target != vocab.IGNORE_INDEX
        logits = self.lm_head(h[:, :-1][sel])            # only supervised positions
        return logits, target[sel], is_vla.bool()[:, None].expand_as(target)[sel]

    def head_on_rows(self, h: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor,
                     rows: torch.Tensor) -> torch.Tensor:
        """The head on the VLA rows. With none, it still runs on one row (the loss adds 0 x its
        output), so every parameter gets a (zero) gradient in every step: data-parallel ranks
        then agree on which gradients exist (DDP needs no unused-parameter search; FSDP
        reduce-scatters the same tensors on every rank)."""
        if not bool(rows.any()):
            return self.action_head(h[:1], self.head_context(ids[:1], valid[:1]))
        return self.action_head(h[rows], self.head_context(ids[rows], valid[rows]))

    # -- inference

    @torch.no_grad()
    def predict_chunk(self, ids: torch.Tensor) -> torch.Tensor:
        """Continuous mode: ids = prompt + ACTION_START (B, L) -> normalized actions (B, K, D)."""
        valid = torch.ones_like(ids, dtype=torch.bool)
        h = self.hidden(ids, valid)
        return self.action_head(h, self.head_context(ids, valid))

    # -- loading a pretrained backbone

    @torch.no_grad()
    def load_pretrained(self, path: str | Path) -> dict[str, int]:
        """Load a local Hugging Face-format Chameleon checkpoint (`model.*` backbone keys,
        `lm_head.weight`; `model.vqmodel.*` is ignored). Every backbone and lm_head weight must
        be present with the preset's shape; the action head stays freshly initialized."""
        files = sorted(Path(path).glob("*.safetensors"))
        if not files:
            raise RynnError(f"--init {path}: no *.safetensors files (a Hugging Face Chameleon "
                            "checkpoint directory is expected)")
        own = self.state_dict()
        loaded: set[str] = set()
        skipped = 0
        for f in files:
            for key, tensor in load_file(str(f)).items():
                name = _map_key(key)
                if name is None:
                    skipped += 1
                    continue
                _check_fits(f, key, name, tensor, own)
                own[name].copy_(tensor)
                loaded.add(name)
        missing = [k for k in own if not k.startswith("action_head.") and k not in loaded]
        if missing:
            raise RynnError(f"--init {path}: {len(missing)} backbone weights missing, e.g. "
                            f"{missing[:3]} (is this a Chameleon checkpoint of this preset?)")
        return {"loaded": len(loaded), "skipped_vq": skipped}


def _map_key(key: str) -> str | None:
    """HF ChameleonForConditionalGeneration key -> RynnModel key (None: VQ weights, ignored)."""
    if key.startswith("model.vqmodel."):
        return None
    if key.startswith("model."):
        return "backbone." + key[len("model."):]
    return key


def _check_fits(file: Path, key: str, name: str, tensor: torch.Tensor,
                own: dict[str, torch.Tensor]) -> None:
    if name not in own:
        raise RynnError(f"--init {file}: unexpected key {key}")
    if own[name].shape != tensor.shape:
        raise RynnError(f"--init {file}: key {key} ({tuple(tensor.shape)}) does not fit the model "
                        f"preset (expected {tuple(own[name].shape)}); choose the matching --preset")
