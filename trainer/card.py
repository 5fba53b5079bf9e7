"""A checkpoint's processor card and the loaders it names: what inference must reproduce.

    from trainer.card import read_card, resolve_checkpoint
    card = read_card(resolve_checkpoint("runs/demo"))    # run dir, its `latest`, or a step dir
    card.chunk, card.action_dim, card.resolution, card.orientation, card.stats

`processor.json` (written by `trainer.checkpoint.processor_card`) records the shard manifest's
digest, the stats, the tokenizer and VQ-GAN records, the vocabulary facts, recipe, K, D, M,
resolution and orientation. `load_tokenizer_for` / `load_vq_for` load the text tokenizer and the
VQ-GAN it names and refuse any whose digest differs. This module knows nothing of models.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import RynnError
from shards.bins import Stats
from shards.conversation import Codec

RANDOM_VQ_SOURCE = re.compile(r"random-(\w+)-seed(\d+)")


ORIENTATIONS = ("rot180", "none")


class PolicyError(RynnError):
    """Inputs that do not match the checkpoint's processor card, or an unusable checkpoint."""


class MalformedActions(PolicyError):
    """Discrete decoding produced action blocks that cannot be parsed; `problems` lists why."""

    def __init__(self, problems: list[str], tokens: np.ndarray) -> None:
        super().__init__("malformed generated action blocks: " + "; ".join(problems))
        self.problems, self.tokens = problems, tokens


@dataclass(frozen=True)
class Card:
    """The preprocessing facts of a checkpoint, read from its `processor.json`."""

    resolution: int
    orientation: str
    chunk: int                       # K
    action_dim: int                  # D
    state_dim: int
    history: int                     # M
    stats: Stats
    tokenizer: dict[str, Any]        # {"kind", "digest", "path"}
    vq: dict[str, Any]               # {"digest", "untrained", "source", "arch"}
    recipe: str = ""
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def published_fit(self) -> bool:
        """Trained on shards made with compat=published (the published image fitting)."""
        return self.raw.get("fit") == "published"

    @property
    def square_only(self) -> bool:
        """Trained on square frames only: a non-square frame at inference is an error (the
        "stretch" and "published" fittings take any shape, as in training)."""
        return self.raw.get("fit", "square") == "square"

    @property
    def relative_dims(self) -> tuple[int, ...]:
        return tuple(self.stats.relative_action_dims)

    @property
    def num_bins(self) -> int:
        return self.stats.num_bins

    def codec(self) -> Codec:
        return Codec.from_stats(self.stats, self.num_bins, self.relative_dims)

    def __post_init__(self) -> None:
        if self.orientation not in ORIENTATIONS:
            raise PolicyError(f"processor card: orientation {self.orientation!r} is not one of "
                              f"{ORIENTATIONS}")
        if self.stats.action.dim != self.action_dim or self.stats.state.dim != self.state_dim:
            raise PolicyError(f"processor card: stats dims (state {self.stats.state.dim}, action "
                              f"{self.stats.action.dim}) differ from the card's state_dim "
                              f"{self.state_dim} / action_dim {self.action_dim}")


def load_tokenizer_for(card: Card, path: str | Path | None):
    """The text tokenizer the card names: `path`, the recorded path, or the fallback."""
    from shards.tokenizer import fallback_tokenizer, load_text_tokenizer
    want = card.tokenizer.get("digest")
    if path is None and card.tokenizer.get("kind") == "fallback":
        tok = fallback_tokenizer(warn=False)
    elif path is None and card.tokenizer.get("path") and Path(card.tokenizer["path"]).is_file():
        tok = load_text_tokenizer(card.tokenizer["path"])
    elif path is None:
        raise PolicyError(f"this checkpoint was trained with the Chameleon tokenizer "
                          f"(sha256 {want}); pass tokenizer_path / --tokenizer-path")
    else:
        tok = load_text_tokenizer(path)
    if tok.digest != want:
        raise PolicyError(f"tokenizer {path or card.tokenizer.get('path') or tok.kind} has digest "
                          f"{tok.digest}, but the checkpoint was trained with {want}: its text "
                          "and image ids would mean other tokens; pass the tokenizer used to "
                          "build the training shards")
    return tok


def load_vq_for(card: Card, path: str | Path | None, device: torch.device):
    """The VQ-GAN the card names (a path, or the seeded random init it records); digest-checked."""
    from shards.vq import load_vq
    want, source = card.vq.get("digest"), str(card.vq.get("source") or "")
    match = RANDOM_VQ_SOURCE.fullmatch(source)
    if path is None and not match:
        raise PolicyError(f"this checkpoint's image tokens come from VQ-GAN {source!r} (digest "
                          f"{want}); pass vq_path / --vq-path")
    handle = (load_vq(path, device=device) if path is not None else
              load_vq(None, random_arch=match.group(1), seed=int(match.group(2)), device=device))
    if handle.digest != want:
        raise PolicyError(f"VQ-GAN {path or source} has digest {handle.digest}, but the "
                          f"checkpoint's shards were tokenized with {want}: its image tokens "
                          "would differ; pass the VQ-GAN used by the pretokenize stage")
    return handle


CARD_FILE = "processor.json"


LATEST = "latest"


def resolve_checkpoint(path: str | Path) -> Path:
    """A `step-NNNNNN/` directory, or a run directory / `latest` pointer leading to one."""
    path = Path(path)
    if path.is_file() and path.name == LATEST:
        path = path.parent / path.read_text().strip()
    elif path.is_dir() and not (path / CARD_FILE).exists() and (path / LATEST).exists():
        return resolve_checkpoint(path / LATEST)
    if not (path / CARD_FILE).is_file():
        raise PolicyError(f"{path}: no {CARD_FILE}: not a checkpoint directory (expected a "
                          f"run's step-NNNNNN/ directory, the run directory, or its '{LATEST}')")
    return path.resolve()


def read_card(step_dir: Path) -> Card:
    """Parse `processor.json` into a Card (missing fields are named in the error)."""
    from pipeline.io import read_json
    return parse_card(read_json(step_dir / CARD_FILE), where=str(step_dir / CARD_FILE))


def parse_card(doc: dict[str, Any], where: str) -> Card:
    """A processor card document (as in `processor.json`) -> Card."""
    try:
        stats = Stats.from_dict(doc["stats"], where=where)
        return Card(resolution=int(doc["resolution"]), orientation=str(doc["orientation"]),
                    chunk=int(doc["K"]), action_dim=int(doc["D"]),
                    state_dim=int(doc.get("state_dim", stats.state.dim)),
                    history=int(doc["M"]), stats=stats, tokenizer=dict(doc["tokenizer"]),
                    vq=dict(doc["vq"]), recipe=str(doc.get("recipe", "")), raw=doc)
    except KeyError as exc:
        raise PolicyError(f"{where}: missing field {exc}") from exc
