"""`--init`: reconcile a Hugging Face Chameleon checkpoint's config.json with the model preset.

    from trainer.pretrained import reconcile
    model_cfg, notes = reconcile(cfg.model, Path("ckpts/chameleon-7b"))   # before building the model

Every architecture field of the checkpoint is compared with the preset; none is replaced
silently. Fields that change no weight shape (`rope_theta`, `rms_norm_eps`, `swin_norm`,
`hidden_act`, `max_position_embeddings`) are ADOPTED from the checkpoint, each named in a note.
Fields that change weight shapes or the set of weights (hidden size, layers, heads, vocabulary,
biases, tied embeddings, RoPE scaling) are REFUSED with one error naming every differing field and
the `--preset` / `--set` that fits. The weights themselves are loaded by
`RynnModel.load_pretrained`; this module only reads config.json.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from pipeline.errors import RynnError
from shards import vocab
from trainer.config import ModelConfig

# checkpoint field -> ModelConfig field, adopted when they differ (no weight changes shape)
ADOPTED = {"rope_theta": "rope_theta", "rms_norm_eps": "rms_norm_eps", "swin_norm": "swin_norm",
           "hidden_act": "hidden_act", "max_position_embeddings": "max_positions"}
# checkpoint field -> ModelConfig field that must already agree (they shape the weights)
SHAPED = {"hidden_size": "hidden", "intermediate_size": "intermediate",
          "num_hidden_layers": "layers", "num_attention_heads": "heads",
          "num_key_value_heads": "kv_heads"}
# checkpoint field -> the only value RynnModel builds
FIXED = {"vocab_size": vocab.VOCAB_SIZE, "attention_bias": False, "mlp_bias": False,
         "tie_word_embeddings": False, "rope_type": "default"}


def checkpoint_fields(path: Path) -> dict[str, Any]:
    """The architecture fields of a checkpoint's config.json, read through transformers (so old
    and new spellings, e.g. a top-level `rope_theta` or `rope_parameters`, both work)."""
    # transformers: seconds to import, only loading a model needs it
    from transformers import ChameleonConfig
    if not (path / "config.json").is_file():
        raise RynnError(f"--init {path}: no config.json (a Hugging Face Chameleon checkpoint "
                        "directory is expected)")
    try:
        config = ChameleonConfig.from_pretrained(path)
    except (ValueError, TypeError, OSError) as exc:
        raise RynnError(f"--init {path / 'config.json'}: not a Chameleon config ({exc})") from exc
    rope = dict(config.rope_parameters or {})
    fields = {k: getattr(config, k) for k in [*ADOPTED, *SHAPED, *FIXED] if hasattr(config, k)}
    fields["rope_theta"] = float(rope.get("rope_theta", 10000.0))
    fields["rope_type"] = rope.get("rope_type", "default")
    if fields.get("num_key_value_heads") is None:
        fields["num_key_value_heads"] = fields["num_attention_heads"]
    return fields


def reconcile(cfg: ModelConfig, path: str | Path) -> tuple[ModelConfig, list[str]]:
    """(the preset with the checkpoint's adopted fields, one note per adopted field); raises
    naming every field that cannot be adopted."""
    path = Path(path)
    fields = checkpoint_fields(path)
    refused = [f"{k}={fields[k]!r} (preset {cfg.name!r} has model.{ours}={getattr(cfg, ours)!r})"
               for k, ours in SHAPED.items() if fields[k] != getattr(cfg, ours)]
    refused += [f"{k}={fields[k]!r} (rynn-pipe builds {want!r})"
                for k, want in FIXED.items() if k in fields and fields[k] != want]
    if refused:
        hint = ", ".join(f"--set model.{SHAPED[r.split('=')[0]]}={fields[r.split('=')[0]]}"
                         for r in refused if r.split("=")[0] in SHAPED)
        raise RynnError(f"--init {path}: config.json differs from the model preset in fields "
                        f"that shape the weights: {'; '.join(refused)}"
                        + (f"; choose the matching --preset or {hint}" if hint else ""))
    changes = {ours: _typed(getattr(cfg, ours), fields[k]) for k, ours in ADOPTED.items()
               if k in fields and fields[k] != getattr(cfg, ours)}
    notes = [f"--init {path}: adopted {k}={fields[k]!r} from config.json (preset {cfg.name!r} "
             f"has {getattr(cfg, ours)!r})" for k, ours in ADOPTED.items() if ours in changes]
    return replace(cfg, **changes), notes


def _typed(current: Any, value: Any) -> Any:
    return type(current)(value)
