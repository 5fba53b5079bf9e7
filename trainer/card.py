"""A checkpoint's processor card and the loaders it names: what inference must reproduce.

    from trainer.card import read_card, resolve_checkpoint
    card = read_card(resolve_checkpoint("runs/demo"))    # run dir, its `latest`, or a step dir
    card.chunk, card.action_dim, card.resolution, card.orientation, card.stats

`processor.json` (written by `trainer.checkpoint.processor_card`) records the shard manifest's
digest, the stats, the tokenizer and VQ-GAN records (`shards.records`, read into `card.tokenizer`
and `card.vq`; cards of earlier versions with a string-only VQ record are read too), the
vocabulary facts, recipe, K, D, M, resolution and orientation. The text tokenizer and the VQ-GAN
it names are loaded, digest-checked, by `shards.tokenizer.load_tokenizer_from_record` and
`shards.vq.load_vq_from_record`. This module knows nothing of models.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import DataError, RynnError
from pipeline.io import read_json
from shards.bins import Stats
from shards.conversation import Codec
from shards.records import TokenizerRecord, VQRecord

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
    tokenizer: TokenizerRecord       # load with shards.tokenizer.load_tokenizer_from_record
    vq: VQRecord                     # load with shards.vq.load_vq_from_record
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
    return parse_card(read_json(step_dir / CARD_FILE), where=str(step_dir / CARD_FILE))


def parse_card(doc: dict[str, Any], where: str) -> Card:
    """A processor card document (as in `processor.json`) -> Card."""
    try:
        stats = Stats.from_dict(doc["stats"], where=where)
        return Card(resolution=int(doc["resolution"]), orientation=str(doc["orientation"]),
                    chunk=int(doc["K"]), action_dim=int(doc["D"]),
                    state_dim=int(doc.get("state_dim", stats.state.dim)),
                    history=int(doc["M"]), stats=stats,
                    tokenizer=TokenizerRecord.from_json(doc["tokenizer"]),
                    vq=VQRecord.from_json(doc["vq"]), recipe=str(doc.get("recipe", "")), raw=doc)
    except KeyError as exc:
        raise PolicyError(f"{where}: missing field {exc}") from exc
    except DataError as exc:                 # a malformed tokenizer / VQ record
        raise PolicyError(f"{where}: {exc}") from exc
