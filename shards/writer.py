"""Deterministic, size-bounded, atomically written tar shards (gzip or plain) and their manifest.

Bytes depend only on the samples: tar members carry mtime 0, uid/gid 0, empty user/group names,
mode 0644 (`shards.format.member_bytes`); gzip streams carry mtime 0 and no file name. A shard
closes before a sample would push its UNCOMPRESSED tar past `shard.max_shard_bytes` (what a reader
holds in memory; the file on disk is smaller) or its count past `shard.max_shard_samples`; a single
sample larger than the bound gets a shard of its own. Each shard is written to `.tmp-<name>.*`
beside its final name and renamed when complete.

    with ShardSetWriter(out, cfg.shard) as writer:
        writer.add(sample, split="train", instruction="pick up the bowl")
    entries = writer.entries          # [{"path", "kind", "samples", "bytes", "sha256", ...}]
"""

from __future__ import annotations

import contextlib
import gzip
from collections import Counter
from pathlib import Path
from typing import Any

from pipeline.config import ShardConfig
from pipeline.io import atomic_open, file_entry
from shards.conversation import KINDS, ConvSample
from shards.format import END_OF_ARCHIVE, sample_key, sample_members, sample_tar_bytes, shard_name

GZIP_LEVEL = 6


class KindWriter:
    """Shards of one kind (`vla-000000.tar.gz`, `vla-000001.tar.gz`, ...)."""

    def __init__(self, out: Path, kind: str, cfg: ShardConfig) -> None:
        self.out, self.kind, self.cfg = Path(out), kind, cfg
        self.entries: list[dict[str, Any]] = []
        self._stack: contextlib.ExitStack | None = None
        self._stream = None
        self._bytes = 0
        self._counts: Counter = Counter()

    def add(self, data: bytes, split: str, tokens: int) -> None:
        """Append one sample's tar bytes, opening or rolling over the shard as needed."""
        if self._stream is not None and self._full(len(data)):
            self.close()
        if self._stream is None:
            self._open()
        self._stream.write(data)
        self._bytes += len(data)
        self._counts.update({"samples": 1, f"split:{split}": 1, "tokens": tokens})

    def _full(self, extra: int) -> bool:
        return (self._counts["samples"] >= self.cfg.max_shard_samples
                or self._bytes + extra + len(END_OF_ARCHIVE) > self.cfg.max_shard_bytes)

    def _open(self) -> None:
        name = shard_name(self.kind, len(self.entries), self.cfg.compression)
        self._stack = contextlib.ExitStack()
        raw = self._stack.enter_context(atomic_open(self.out / name, "wb"))
        if self.cfg.compression == "gz":
            raw = self._stack.enter_context(
                gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0,
                              compresslevel=GZIP_LEVEL))
        self._stream, self._name = raw, name
        self._bytes, self._counts = 0, Counter()

    def close(self) -> None:
        """Finish the open shard (end-of-archive blocks, flush, rename) and record its entry."""
        if self._stream is None:
            return
        self._stream.write(END_OF_ARCHIVE)
        self._stack.close()
        self._stream = self._stack = None
        entry = file_entry(self.out / self._name, self.out)
        splits = {k.split(":", 1)[1]: v for k, v in sorted(self._counts.items())
                  if k.startswith("split:")}
        self.entries.append({**entry, "kind": self.kind, "samples": self._counts["samples"],
                             "tokens": self._counts["tokens"], "splits": splits,
                             "tar_bytes": self._bytes + len(END_OF_ARCHIVE)})

    def abort(self) -> None:
        """Drop the open shard (its temp file is removed)."""
        if self._stack is not None:
            with contextlib.suppress(_Abort):
                self._stack.__exit__(_Abort, _Abort(), None)
        self._stream = self._stack = None


class _Abort(Exception):
    """Raised into the open shard's context to discard its temp file."""


class ShardSetWriter:
    """One KindWriter per sample kind; `entries` lists every finished shard (vla first)."""

    def __init__(self, out: str | Path, cfg: ShardConfig) -> None:
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.writers = {kind: KindWriter(self.out, kind, cfg) for kind in KINDS}

    def add(self, sample: ConvSample, split: str, instruction: str) -> None:
        key = sample_key(sample.episode, sample.step)
        data = sample_tar_bytes(key, sample_members(sample, split, instruction))
        self.writers[sample.kind].add(data, split, len(sample.tokens))

    @property
    def entries(self) -> list[dict[str, Any]]:
        return [e for kind in KINDS for e in self.writers[kind].entries]

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()

    def __enter__(self) -> "ShardSetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            for writer in self.writers.values():
                writer.abort()


def totals(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Samples, tokens and bytes per kind, and samples per kind and split."""
    out: dict[str, Any] = {}
    for e in entries:
        t = out.setdefault(e["kind"], {"shards": 0, "samples": 0, "tokens": 0, "bytes": 0,
                                       "splits": {}})
        t["shards"] += 1
        for k in ("samples", "tokens", "bytes"):
            t[k] += e[k]
        for split, n in e["splits"].items():
            t["splits"][split] = t["splits"].get(split, 0) + n
    return out
