"""Shard sets at a URL: the manifest and shards streamed into a bounded local cache, each shard's
sha256 checked against the manifest before any of its samples is used.

    ShardReader("https://data.example.org/libero_goal/shards", batch_size=8)    # the reader
    rynn-pipe verify https://data.example.org/libero_goal/shards                # verify, inspect
    rynn-pipe inspect s3://bucket/libero_goal/shards -o sample.png              # any fsspec URL

    remote = RemoteShardSet("http://127.0.0.1:8000/shards")
    with remote.local("vla-000000.tar.gz") as path:   # downloaded once, sha256-checked, pinned
        samples = read_shard(path)                     # shards/shard_set.py
    ShardSet.open("http://127.0.0.1:8000/shards")     # how the rest of rynn-pipe opens one

`ShardSet.open(url)` (shards/shard_set.py) wraps this: callers never branch on URL vs directory.
`http://` and `https://` are read with the standard library (no extra dependency); every other
scheme (`s3://`, `gs://`, `file://`, `memory://` ...) through fsspec, with whatever fsspec backend
package the scheme needs installed by the user. The manifest is fetched first; the cache directory
is keyed by its sha256 (`<cache>/<digest[:16]>/`, one per rank under torchrun), so a changed
shard set never mixes with an old one. A shard is downloaded to a temporary name while its sha256 is computed, compared with the
manifest's `bytes` and `sha256`, and only then renamed into the cache: a shard whose bytes differ
raises `DataError` naming the URL and is never read. Once the cache holds more than its bound
(`RYNN_SHARD_CACHE_GB`, default 8 GiB) the least recently used shards not in use are deleted.
Cache root: `RYNN_SHARD_CACHE`, else `$RYNN_HOME/shard-cache`, else `~/.cache/rynn-pipe/shards`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import urllib.error
import urllib.request
from collections import OrderedDict
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from pipeline.errors import DataError
from pipeline.group import Group
from pipeline.io import sha256_bytes, write_bytes
from shards.format import MANIFEST

CHUNK = 1 << 20
DEFAULT_CACHE_GB = 8.0


def is_url(location: str | os.PathLike) -> bool:
    """True for `scheme://...` (a local path never has `://`)."""
    return isinstance(location, str) and "://" in location


def cache_root() -> Path:
    if os.environ.get("RYNN_SHARD_CACHE"):
        return Path(os.environ["RYNN_SHARD_CACHE"])
    if os.environ.get("RYNN_HOME"):
        return Path(os.environ["RYNN_HOME"]) / "shard-cache"
    return Path.home() / ".cache" / "rynn-pipe" / "shards"


def cache_bound() -> int:
    text = os.environ.get("RYNN_SHARD_CACHE_GB", str(DEFAULT_CACHE_GB))
    try:
        gb = float(text)
    except ValueError as exc:
        raise DataError(f"RYNN_SHARD_CACHE_GB={text!r}: not a number of GiB") from exc
    if gb <= 0:
        raise DataError(f"RYNN_SHARD_CACHE_GB={text!r}: must be > 0")
    return int(gb * (1 << 30))


@contextlib.contextmanager
def open_url(url: str, timeout: float = 60.0) -> Iterator[BinaryIO]:
    """A readable binary stream of `url` (http(s) by urllib, anything else by fsspec)."""
    if url.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                yield response
        except urllib.error.URLError as exc:
            raise DataError(f"cannot fetch: {getattr(exc, 'reason', exc)}", file=url) from exc
        return
    import fsspec  # slow to import; only non-http URLs need it
    try:
        handle = fsspec.open(url, "rb").open()
    except (OSError, ValueError, ImportError) as exc:
        raise DataError(f"cannot open through fsspec: {type(exc).__name__}: {exc}",
                        file=url) from exc
    with handle:
        yield handle


def fetch_bytes(url: str) -> bytes:
    with open_url(url) as stream:
        return stream.read()


class RemoteShardSet:
    """The shard set at `url`: its manifest, and its shards fetched on demand into the cache."""

    def __init__(self, url: str, *, cache_dir: str | Path | None = None,
                 max_bytes: int | None = None) -> None:
        self.url = url.rstrip("/")
        self.manifest_bytes = raw = fetch_bytes(f"{self.url}/{MANIFEST}")
        try:
            self.manifest = json.loads(raw)
            self.entries = {e["path"]: e for e in self.manifest["shards"]}
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"not a shard manifest ({type(exc).__name__}: {exc})",
                            file=f"{self.url}/{MANIFEST}") from exc
        # under torchrun each rank keeps its own cache: pins and eviction are per process
        group = Group.from_env()
        rank = f"-rank{group.rank}" if group.world > 1 else ""
        self.root = Path(cache_dir or cache_root()) / f"{sha256_bytes(raw)[:16]}{rank}"
        self.root.mkdir(parents=True, exist_ok=True)
        write_bytes(self.root / MANIFEST, raw)
        self.max_bytes = max_bytes if max_bytes is not None else cache_bound()
        self._lock = threading.Lock()
        self._pins: dict[str, int] = {}
        self._lru: OrderedDict[str, int] = OrderedDict(self._cached())
        self._fetch_side_files()
        self.downloads = 0

    def _cached(self) -> list[tuple[str, int]]:
        """Shards already in the cache (verified before they were renamed in), oldest first."""
        found = [(p.stat().st_mtime, p.name, p.stat().st_size) for p in self.root.iterdir()
                 if p.name in self.entries and p.stat().st_size == self.entries[p.name]["bytes"]]
        return [(name, size) for _, name, size in sorted(found)]

    def _fetch_side_files(self) -> None:
        """The stats copy the manifest lists (small; sha256-checked, never evicted)."""
        stats = self.manifest.get("stats")
        if stats and "path" in stats and not (self.root / stats["path"]).exists():
            data = fetch_bytes(f"{self.url}/{stats['path']}")
            if stats.get("sha256") and sha256_bytes(data) != stats["sha256"]:
                raise DataError("sha256 differs from the manifest",
                                file=f"{self.url}/{stats['path']}")
            write_bytes(self.root / stats["path"], data)

    # -- shards

    @contextlib.contextmanager
    def local(self, name: str) -> Iterator[Path]:
        """The verified local copy of shard `name`, kept in the cache while the block runs."""
        path = self.fetch(name, pin=True)
        try:
            yield path
        finally:
            with self._lock:
                self._pins[name] -= 1
                self._evict()

    def fetch(self, name: str, *, pin: bool = False) -> Path:
        """Download shard `name` unless cached; check its size and sha256 against the manifest."""
        if name not in self.entries:
            raise DataError(f"shard {name} is not listed in the manifest", file=self.url)
        path = self.root / name
        with self._lock:
            if name in self._lru:
                self._lru.move_to_end(name)
                self._pins[name] = self._pins.get(name, 0) + pin
                return path
        self._download(name, path)
        with self._lock:
            self._lru[name] = self.entries[name]["bytes"]
            self._pins[name] = self._pins.get(name, 0) + pin
            self.downloads += 1
            self._evict()
        return path

    def _download(self, name: str, path: Path) -> None:
        entry, url = self.entries[name], f"{self.url}/{name}"
        tmp = path.with_name(f".{name}.{os.getpid()}.{threading.get_ident()}.part")
        digest, size = hashlib.sha256(), 0
        try:
            with open_url(url) as stream, open(tmp, "wb") as out:
                while block := stream.read(CHUNK):
                    digest.update(block)
                    out.write(block)
                    size += len(block)
            if size != entry["bytes"] or digest.hexdigest() != entry["sha256"]:
                raise DataError(f"{size} bytes with sha256 {digest.hexdigest()[:16]}..., the "
                                f"manifest says {entry['bytes']} bytes, {entry['sha256'][:16]}...:"
                                " the shard differs from its manifest and was not used", file=url)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def _evict(self) -> None:
        """Delete least recently used shards not in use until the cache fits its bound."""
        total = sum(self._lru.values())
        for name in list(self._lru):
            if total <= self.max_bytes:
                return
            if self._pins.get(name, 0) == 0:
                (self.root / name).unlink(missing_ok=True)
                total -= self._lru.pop(name)

    def cached_bytes(self) -> int:
        with self._lock:
            return sum(self._lru.values())

    def describe(self) -> dict[str, Any]:
        return {"url": self.url, "cache": str(self.root), "max_bytes": self.max_bytes}
