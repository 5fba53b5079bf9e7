"""One shard set, opened once: a directory (or the URL of one) holding `manifest.json`, the shards
it lists and the `stats.json` copy. Every reader of a shard set goes through it: the training
reader, verify, inspect, evaluation, the world-model tools, the processor card and training.

    shards = ShardSet.open("out/demo/shards")    # or "https://host/demo/shards", any fsspec URL
    shards.manifest, shards.sha256                # the manifest as read, and its bytes' sha256
    for entry in shards.entries("vla"):           # the manifest's shard entries of a kind
        samples = shards.read(entry, "val")       # sha256-checked against the manifest
    shards.stats()                                # shards.bins.Stats (sha256-checked too)

A URL shard set fetches its manifest first and each shard on demand into a bounded, verified local
cache (shards/remote.py); `root` is then that cache directory and everything else is the same.
Errors are one line naming the file (`DataError`).
"""

from __future__ import annotations

import contextlib
import json
import zlib
from pathlib import Path
from typing import Any

from pipeline.errors import DataError
from pipeline.io import sha256_bytes
from shards.bins import Stats
from shards.format import (KINDS, MANIFEST, STATS, Sample, decode_npy, decode_shard, tar_bytes,
                           tar_members)
from shards.remote import RemoteShardSet, fetch_bytes, is_url


class ShardSet:
    """The manifest of a shard set and access to its files. Build with `ShardSet.open`."""

    def __init__(self, root: Path, manifest_bytes: bytes, *, where: str,
                 remote: RemoteShardSet | None = None) -> None:
        self.root, self.remote, self.where = root, remote, where
        self.manifest_file = f"{where}/{MANIFEST}"
        self.manifest_bytes, self.sha256 = manifest_bytes, sha256_bytes(manifest_bytes)
        try:
            self.manifest: dict[str, Any] = json.loads(manifest_bytes)
            kinds = {e["kind"] for e in self.manifest["shards"]}
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"not a shard manifest ({type(exc).__name__}: {exc})",
                            file=self.manifest_file) from None
        if not kinds <= set(KINDS):
            raise DataError(f"unknown shard kind {sorted(kinds - set(KINDS))[0]!r}",
                            file=self.manifest_file)

    @classmethod
    def open(cls, location: "str | Path | ShardSet", *, cache_dir: str | Path | None = None,
             max_bytes: int | None = None) -> "ShardSet":
        """The shard set at a directory or URL (an open `ShardSet` is returned as it is);
        `cache_dir`, `max_bytes`: the local cache of a URL set (shards/remote.py)."""
        if isinstance(location, ShardSet):
            return location
        if is_url(location):
            remote = RemoteShardSet(str(location), cache_dir=cache_dir, max_bytes=max_bytes)
            return cls(remote.root, remote.manifest_bytes, where=remote.url, remote=remote)
        root = Path(location)
        try:
            data = (root / MANIFEST).read_bytes()
        except OSError:
            raise DataError(f"no {MANIFEST}: not a shard directory (run `rynn-pipe tokenize`)",
                            file=str(root / MANIFEST)) from None
        return cls(root, data, where=str(root))

    @staticmethod
    def is_shard_set(location: str | Path) -> bool:
        """A URL, or a directory holding a manifest (without reading it)."""
        return is_url(location) or (Path(location) / MANIFEST).is_file()

    # -- the manifest's records

    def entries(self, kind: str | None = None) -> list[dict[str, Any]]:
        """The manifest's shard entries ({"path", "kind", "samples", "splits", "sha256", ...})."""
        return [e for e in self.manifest["shards"] if kind is None or e["kind"] == kind]

    @property
    def splits(self) -> dict[str, Any]:
        """{"episodes": {episode: split}, "counts", "training_split", ...} (may be empty)."""
        return self.manifest.get("splits", {})

    @property
    def training_split(self) -> str:
        return self.splits.get("training_split", "train")

    def split_samples(self, split: str) -> int:
        """Samples of `split` over every kind, from the manifest totals."""
        return sum(int(t.get("splits", {}).get(split, 0))
                   for t in self.manifest["totals"].values())

    def record(self, name: str) -> dict[str, Any]:
        """A required manifest record ("conv", "vocab", "recipe", "tokenizer", "vq", ...)."""
        if name not in self.manifest:
            raise DataError(f"manifest has no {name!r} record", file=self.manifest_file)
        return self.manifest[name]

    def current_sha256(self) -> str:
        """The sha256 of the manifest as it is now (re-read, or re-fetched for a URL)."""
        if self.remote is not None:
            return sha256_bytes(fetch_bytes(self.manifest_file))
        return sha256_bytes((self.root / MANIFEST).read_bytes())

    # -- files

    def path(self, entry: dict[str, Any]) -> Path:
        """Where a listed file lives locally (for a URL set: its place in the cache)."""
        return self.root / entry["path"]

    def local(self, entry: dict[str, Any]) -> contextlib.AbstractContextManager[Path]:
        """The shard's local file; a URL shard set fetches, sha256-checks and pins it first."""
        if self.remote is None:
            return contextlib.nullcontext(self.path(entry))
        return self.remote.local(entry["path"])

    def read(self, entry: dict[str, Any], split: str = "all") -> list[Sample]:
        """The samples of `split` of a listed shard, its sha256 checked against the manifest."""
        with self.local(entry) as path:
            return read_shard(path, split, entry.get("sha256"))

    def tar(self, entry: dict[str, Any]) -> bytes:
        """The uncompressed tar bytes of a listed shard, its sha256 checked."""
        with self.local(entry) as path:
            return read_shard_bytes(path, entry.get("sha256"))

    def stats_path(self) -> Path:
        return self.root / self.manifest.get("stats", {}).get("path", STATS)

    def stats_record(self) -> dict[str, Any]:
        """The `stats.json` copy as JSON, its sha256 checked against the manifest."""
        info, path = self.manifest.get("stats", {}), self.stats_path()
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise DataError(f"stats unreadable ({type(exc).__name__})", file=str(path)) from None
        if info.get("sha256") and sha256_bytes(data) != info["sha256"]:
            raise DataError(f"stats differ from their sha256 in {MANIFEST}; run `rynn-pipe "
                            "verify`", file=str(path))
        return json.loads(data)

    def stats(self) -> Stats:
        return Stats.from_dict(self.stats_record(), where=str(self.stats_path()))


# ---------------------------------------------------------------- one shard file


def read_shard_bytes(path: Path, sha256: str | None = None) -> bytes:
    """The uncompressed tar bytes of a `.tar.gz` or `.tar` shard; with `sha256` (the manifest's),
    a shard that differs (damaged, or re-exported while a run reads the set) is an error."""
    try:
        data = Path(path).read_bytes()
        if sha256 is not None and sha256_bytes(data) != sha256:
            raise DataError("shard differs from its sha256 in manifest.json (damaged, or the shard "
                            "set was re-exported while being read); run `rynn-pipe verify` on it "
                            "and restart", file=str(path))
        return tar_bytes(path.name, data)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"shard unreadable ({type(exc).__name__}: {exc}); run `rynn-pipe verify` "
                        "on the shard set (re-exported while being read?)",
                        file=str(path)) from None


def read_shard(path: Path, split: str = "all", sha256: str | None = None) -> list[Sample]:
    """Every sample of one shard file in stored order, keeping those of `split` ("all": all)."""
    return decode_shard(read_shard_bytes(path, sha256), split, file=str(path))


def peek_chunk_shape(path: Path, head_bytes: int = 1 << 20) -> tuple[int, int] | None:
    """Shape of the first `chunk.npy` found in the first `head_bytes` of a shard (no full read)."""
    try:
        with open(path, "rb") as f:
            head = f.read(head_bytes)
        if path.name.endswith(".gz"):
            head = zlib.decompressobj(wbits=31).decompress(head)
    except (OSError, zlib.error) as exc:
        raise DataError(f"shard unreadable ({type(exc).__name__}: {exc}); run `rynn-pipe verify` "
                        "on the shard set", file=str(path)) from None
    for name, payload in tar_members(head, file=str(path), partial=True):
        if name.endswith(".chunk.npy"):
            return tuple(decode_npy(payload, what=name).shape)
    return None

