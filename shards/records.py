"""What a shard manifest and a checkpoint card record about the VQ-GAN and the text tokenizer that
made their tokens: two small frozen records, written and read in one place. Pure: no I/O.

    from shards.records import TokenizerRecord, VQRecord
    rec = VQRecord.from_json(manifest["vq"])      # structured, or an old string-only record
    rec.kind, rec.name, rec.seed, rec.digest      # "random", "small", 0, "221b..."
    manifest["vq"] = rec.to_json()

A VQ record is `kind="random"` (a seeded random init: `name` is the architecture preset of
`shards.vq_arch.RANDOM_ARCHS`, `seed` its seed: the loader rebuilds the same weights) or
`kind="weights"` (a checkpoint given by path: `format` is "original" or "hf"; the path itself is
not recorded, the stage records no paths, so the user passes it at load time). `digest` is the
state digest of the loaded VQ module (`shards.vq.state_digest`). The loaders are
`shards.vq.load_vq_from_record` and `shards.tokenizer.load_tokenizer_from_record`.

Backward compatibility: records written before the structured form (store.json of pretokenize,
manifests and cards of earlier versions) hold `{"digest", "untrained", "source", "arch"}` with the
identity in `source` ("original", "hf" or "random-<name>-seed<n>"); `from_json` reads them. The
JSON form keeps `source` and `untrained` (derived from the structured fields) so that readers of
existing manifests and cards keep working.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import DataError

VQ_KINDS = ("random", "weights")
WEIGHT_FORMATS = ("original", "hf")
RANDOM_PREFIX, SEED_MARK = "random-", "-seed"
TOKENIZER_KINDS = ("fallback", "chameleon")


@dataclass(frozen=True, kw_only=True)
class VQRecord:
    """The identity of a VQ-GAN: how to get the same weights back, and their digest."""

    kind: str                                   # "random" or "weights"
    digest: str | None                          # sha256 of the VQ module's state dict
    arch: dict[str, Any] | None = field(default=None, compare=False)
    name: str | None = None                     # random: the RANDOM_ARCHS preset
    seed: int | None = None                     # random: its seed
    format: str | None = None                   # weights: "original" or "hf"

    def __post_init__(self) -> None:
        if self.kind not in VQ_KINDS:
            raise DataError(f"VQ record: kind {self.kind!r} is not one of {VQ_KINDS}")
        if self.kind == "random" and (not self.name or not isinstance(self.seed, int)):
            raise DataError(f"VQ record: a random VQ-GAN needs its preset name and integer seed, "
                            f"got name={self.name!r} seed={self.seed!r}")
        if self.kind == "weights" and self.format not in WEIGHT_FORMATS:
            raise DataError(f"VQ record: weights format {self.format!r} is not one of "
                            f"{WEIGHT_FORMATS}")

    @property
    def untrained(self) -> bool:
        return self.kind == "random"

    @property
    def source(self) -> str:
        """The one-string identity of earlier versions ("original", "hf", "random-<n>-seed<s>")."""
        return f"{RANDOM_PREFIX}{self.name}{SEED_MARK}{self.seed}" if self.untrained else self.format

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "digest": self.digest, "arch": self.arch,
                               "untrained": self.untrained, "source": self.source}
        if self.untrained:
            out.update(name=self.name, seed=self.seed)
        else:
            out["format"] = self.format
        return out

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "VQRecord":
        """A structured record, or an earlier string-only one (see the module docstring)."""
        if not isinstance(doc, dict):
            raise DataError(f"VQ record: expected an object, got {type(doc).__name__}")
        if "kind" not in doc:
            return cls.from_legacy(doc)
        return cls(kind=doc["kind"], digest=doc.get("digest"), arch=doc.get("arch"),
                   name=doc.get("name"), seed=doc.get("seed"), format=doc.get("format"))

    @classmethod
    def from_legacy(cls, doc: dict[str, Any]) -> "VQRecord":
        """`{"source": "original" | "hf" | "random-<name>-seed<n>", ...}` -> a record."""
        source = str(doc.get("source") or "")
        common = {"digest": doc.get("digest"), "arch": doc.get("arch")}
        if source in WEIGHT_FORMATS:
            return cls(kind="weights", format=source, **common)
        name, mark, seed = source.removeprefix(RANDOM_PREFIX).rpartition(SEED_MARK)
        if not source.startswith(RANDOM_PREFIX) or not mark or not name or not seed.isdigit():
            raise DataError(f"VQ record: source {source!r} is none of 'original', 'hf', "
                            "'random-<name>-seed<n>'")
        return cls(kind="random", name=name, seed=int(seed), **common)


@dataclass(frozen=True, kw_only=True)
class TokenizerRecord:
    """The identity of the text tokenizer: the built-in fallback, or a Chameleon
    `text_tokenizer.json` (its path as given at tokenize time, and the digest of its content)."""

    kind: str                                   # "fallback" or "chameleon"
    digest: str
    path: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in TOKENIZER_KINDS:
            raise DataError(f"tokenizer record: kind {self.kind!r} is not one of "
                            f"{TOKENIZER_KINDS}")

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "digest": self.digest, "path": self.path}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "TokenizerRecord":
        try:
            return cls(kind=doc["kind"], digest=doc["digest"], path=doc.get("path"))
        except (KeyError, TypeError) as exc:
            raise DataError(f"tokenizer record: missing field {exc} in {doc!r}") from exc
