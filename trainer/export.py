"""Export a trained run as a Hugging Face Chameleon directory, and load one back as a Policy.

    rynn-pipe export runs/demo exports/demo            # the run's latest checkpoint
    rynn-pipe export runs/demo/step-000300 exports/demo --vq-path ckpts/chameleon/tokenizer

    from transformers import ChameleonForConditionalGeneration, AutoModel
    lm = ChameleonForConditionalGeneration.from_pretrained("exports/demo")  # every weight, no warning
    backbone = AutoModel.from_pretrained("exports/demo")                    # ChameleonModel
    policy = Policy.from_pretrained("exports/demo")                         # acts as the run does

The directory holds:
    config.json, model.safetensors   a `ChameleonConfig` (the run's architecture, `vocabulary_map`
                                     of the run's tokenizer, `vq_config` of its VQ-GAN) and the
                                     weights under transformers' names: `model.*` (backbone),
                                     `lm_head.weight`, `model.vqmodel.*` (the VQ-GAN encoder the
                                     shards were tokenized with; a seeded random init is rebuilt)
    action_head.safetensors          the action head (`action_head.*`)
    vq_decoder.safetensors           the VQ-GAN decoder (`decoder.*`) when the run's VQ-GAN has one
    rynn.json                        ModelConfig, K, D and where the export came from
    processor.json                   the processor card (preprocessing, stats, digests)
    text_tokenizer.json              the Chameleon tokenizer (runs trained with one)
    README.md                        the model card: recipe, data digests, steps, losses
The directory is written under a temporary name and renamed into place (never half written).
This module knows nothing about serving or training; it only maps names and writes files.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from pipeline.errors import RynnError
from pipeline.io import read_json, read_jsonl, sha256_file, write_bytes, write_json
from shards import vocab
from shards.tokenizer import image_code_name, load_tokenizer_from_record
from shards.vq import load_vq_from_record
from shards.vq_arch import hf_config
from trainer import checkpoint as ckpt
from trainer.card import read_card, resolve_checkpoint
from trainer.config import ModelConfig
from trainer.model import IMAGE_TOKEN, RynnModel, chameleon_config

META = "rynn.json"
HEAD_FILE = "action_head.safetensors"
DECODER_FILE = "vq_decoder.safetensors"
TOKENIZER_FILE = "text_tokenizer.json"
WEIGHTS_FILE = "model.safetensors"
BACKBONE, HF_BACKBONE, VQ = "backbone.", "model.", "model.vqmodel."
SCHEMA = 1


# ---------------------------------------------------------------------------------------------
# Names and config (pure).
# ---------------------------------------------------------------------------------------------

def to_hf_names(weights: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor],
                                                           dict[str, torch.Tensor]]:
    """RynnModel state dict -> (ChameleonForConditionalGeneration weights, action head weights)."""
    hf, head = {}, {}
    for key, tensor in weights.items():
        if key.startswith(BACKBONE):
            hf[HF_BACKBONE + key[len(BACKBONE):]] = tensor
        elif key.startswith("action_head."):
            head[key] = tensor
        elif key == "lm_head.weight":
            hf[key] = tensor
        else:
            raise RynnError(f"export: unknown weight {key} in the checkpoint")
    return hf, head


def from_hf_names(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Exported transformers weights -> RynnModel backbone + lm_head (the VQ-GAN is not part)."""
    return {(BACKBONE + k[len(HF_BACKBONE):] if k.startswith(HF_BACKBONE) else k): v
            for k, v in hf.items() if not k.startswith(VQ)}


def vocabulary_map(tokenizer) -> dict[str, int]:
    """Chameleon's `vocabulary_map`: the tokenizer file's whole vocabulary, or for the fallback
    tokenizer the names transformers needs (`<s>`, `<image>`, one `IMGIMG...` name per code)."""
    if tokenizer.kind == "chameleon":
        return dict(Tokenizer.from_file(tokenizer.path).get_vocab(with_added_tokens=True))
    names = {image_code_name(c): int(i) for c, i in enumerate(tokenizer.image_code_to_id)}
    return {"<s>": vocab.BOS, "<image>": IMAGE_TOKEN, **names}


def export_config(model_cfg: ModelConfig, vocab_map: dict[str, int], vq_arch: dict[str, Any]):
    """The transformers `ChameleonConfig` of a run: its architecture, vocabulary and VQ-GAN."""
    config = chameleon_config(model_cfg)
    config.vocabulary_map = vocab_map
    config.image_token_id = vocab_map.get("<image>")
    config.vq_config = hf_config(vq_arch)
    config.architectures = ["ChameleonForConditionalGeneration"]
    config.dtype = "float32"
    return config


# ---------------------------------------------------------------------------------------------
# Export.
# ---------------------------------------------------------------------------------------------

def export(run: str | Path, out: str | Path, *, vq_path: str | Path | None = None,
           tokenizer_path: str | Path | None = None) -> Path:
    """Write the export directory `out` for a run (its latest checkpoint) or a step directory."""
    step_dir = resolve_checkpoint(run)
    card = read_card(step_dir)
    cfg, chunk, action_dim = ckpt.read_config(step_dir)
    tokenizer = load_tokenizer_from_record(card.tokenizer, tokenizer_path)
    vq = load_vq_from_record(card.vq, vq_path, device="cpu")
    hf, head = to_hf_names(load_file(str(step_dir / WEIGHTS_FILE)))
    hf.update({VQ + k: v for k, v in vq.model.state_dict().items()})
    out = Path(out)
    if out.exists() and not is_export(out) and any(out.iterdir()):
        raise RynnError(f"export: {out} exists and is not an export; choose a new or empty "
                        "directory (an earlier export there is replaced)")
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    export_config(cfg.model, vocabulary_map(tokenizer), vq.arch).save_pretrained(tmp)
    _save(hf, tmp / WEIGHTS_FILE)
    _save(head, tmp / HEAD_FILE)
    if vq.decoder_state:
        _save(vq.decoder_state, tmp / DECODER_FILE)
    if tokenizer.kind == "chameleon":
        shutil.copyfile(tokenizer.path, tmp / TOKENIZER_FILE)
    shutil.copyfile(step_dir / ckpt.CARD, tmp / ckpt.CARD)
    meta = export_meta(step_dir, cfg.model, chunk, action_dim)
    write_json(tmp / META, meta)
    write_bytes(tmp / "README.md", model_card(meta, card.raw, run_summary(step_dir)).encode())
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def _save(state: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path),
              metadata={"format": "pt"})


def export_meta(step_dir: Path, model_cfg: ModelConfig, chunk: int, action_dim: int
                ) -> dict[str, Any]:
    return {"schema": SCHEMA, "model": dataclasses.asdict(model_cfg), "chunk": chunk,
            "action_dim": action_dim, "source": {
                "checkpoint": step_dir.name,
                "weights_sha256": sha256_file(step_dir / WEIGHTS_FILE)}}


def run_summary(step_dir: Path) -> dict[str, Any]:
    """Step, training config and the last logged train / held-out losses of the run."""
    state = torch.load(step_dir / "state.pt", map_location="cpu", weights_only=False)
    train = read_json(step_dir / "config.json")["train"]
    rows = []
    metrics = step_dir.parent / "metrics.jsonl"
    if metrics.exists():
        rows = read_jsonl(metrics, torn_tail=True)
    rows = [r for r in rows if r.get("step", 0) <= state["step"]]
    last_train = next((r for r in reversed(rows) if "loss" in r), None)
    last_val = next((r for r in reversed(rows) if "val_loss" in r), None)
    return {"step": int(state["step"]), "train": train, "last_train": last_train,
            "last_val": last_val}


def model_card(meta: dict[str, Any], card: dict[str, Any], summary: dict[str, Any]) -> str:
    """README.md of the export: what the model is, what it was trained on, how to load it."""
    train, m = summary["train"], meta["model"]
    losses = _losses(summary["last_train"], "") + _losses(summary["last_val"], "val_")
    lines = [
        "---", "library_name: transformers", "tags: [chameleon, robotics, vla, world-model, rynn-pipe]",
        "---", "", f"# RynnVLA-002-style policy ({card.get('recipe', '?')}, step {summary['step']})", "",
        "A unified vision-language-action + world model trained with rynn-pipe: a Chameleon "
        "backbone with a 65,536-id vocabulary, an output projection over every id (image ids "
        "included) and the action-transformer head.", "",
        "## Trained on", "",
        f"- recipe: `{card.get('recipe')}`; K={card.get('K')} actions of D={card.get('D')}, "
        f"history M={card.get('M')}, {card.get('resolution')} px, orientation "
        f"`{card.get('orientation')}`",
        f"- shard manifest sha256: `{card.get('shards_manifest_sha256')}` (the manifest lists "
        "every shard's sha256)",
        f"- tokenizer: {card['tokenizer'].get('kind')} `{card['tokenizer'].get('digest')}`; "
        f"VQ-GAN `{card['vq'].get('digest')}` ({card['vq'].get('source')}"
        f"{', UNTRAINED' if card['vq'].get('untrained') else ''})",
        f"- steps: {summary['step']} of {train.get('steps')}, batch {train.get('batch_size')} x "
        f"{train.get('grad_accum')} accumulation, lr {train.get('lr')} ({train.get('schedule')}), "
        f"loss mode `{train.get('loss_mode')}`, L1 target `{train.get('l1_target')}`",
        f"- model: hidden {m['hidden']}, {m['layers']} layers, {m['heads']} heads, "
        f"rope_theta {m['rope_theta']}, swin_norm {m['swin_norm']}; "
        f"source checkpoint `{meta['source']['checkpoint']}` "
        f"(weights sha256 `{meta['source']['weights_sha256']}`)",
        f"- last logged losses: {', '.join(losses) if losses else 'none logged'}", "",
        "## Loading", "", "```python",
        "from transformers import ChameleonForConditionalGeneration",
        "model = ChameleonForConditionalGeneration.from_pretrained(PATH)   # backbone + lm_head + VQ",
        "from trainer.policy import Policy                                # rynn-pipe",
        "policy = Policy.from_pretrained(PATH)",
        "actions = policy.act(instruction, state, front, wrist)           # (K, D), robot units",
        "```", "",
        "transformers' `ChameleonForConditionalGeneration.forward` masks image-token logits (it "
        "generates text); use `model.model` (the backbone) and `lm_head` for image tokens, and the "
        "action head (`action_head.safetensors`) through rynn-pipe. `processor.json` holds the "
        "preprocessing (stats, orientation, resolution) the inputs must go through.", ""]
    return "\n".join(lines)


def _losses(row: dict[str, Any] | None, prefix: str) -> list[str]:
    if not row:
        return []
    keys = [k for k in row if k.startswith(prefix) and k != "step"
            and ("loss" in k or "ce_" in k or k.endswith("l1"))]
    return [f"{k} {row[k]:.4g} (step {row['step']})" for k in keys
            if isinstance(row[k], (int, float))]


# ---------------------------------------------------------------------------------------------
# Loading an export back.
# ---------------------------------------------------------------------------------------------

def is_export(path: str | Path) -> bool:
    return (Path(path) / META).is_file()


def load_model(path: str | Path) -> torch.nn.Module:
    """The RynnModel of an export directory (eval mode, CPU), loaded strictly."""
    path = Path(path)
    meta = read_json(path / META)
    if meta.get("schema") != SCHEMA:
        raise RynnError(f"{path / META}: schema {meta.get('schema')}, this rynn-pipe reads "
                        f"{SCHEMA}; re-export with this version")
    model = RynnModel(ModelConfig(**meta["model"]), chunk=int(meta["chunk"]),
                      action_dim=int(meta["action_dim"]))
    weights = {**from_hf_names(load_file(str(path / WEIGHTS_FILE))),
               **load_file(str(path / HEAD_FILE))}
    result = model.load_state_dict(weights, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RynnError(f"{path}: weights do not match {META}: missing "
                        f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}")
    return model.eval()


def load_parts(path: str | Path, device: torch.device):
    """(card, tokenizer, VQ handle, model) of an export, each checked against the card."""
    path = Path(path)
    card = read_card(path)
    tok_file = path / TOKENIZER_FILE
    tokenizer = load_tokenizer_from_record(card.tokenizer, tok_file if tok_file.exists() else None)
    vq = load_vq_from_record(card.vq, path, device=device)
    if (path / DECODER_FILE).exists():
        vq.decoder_state = load_file(str(path / DECODER_FILE))
    return card, tokenizer, vq, load_model(path).to(device)
