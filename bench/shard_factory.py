"""Tiny synthetic shard sets in the documented sample format (docs/ARCHITECTURE.md), for tests and
the reader bench, independent of the real writer.

    from bench.shard_factory import make_shards
    manifest = make_shards(tmp_path, vla_shards=[5, 3], wm_shards=[4])

Each shard is a gzip tar (`vla-000000.tar.gz`, ...) whose samples hold `<key>.tokens.npy` (uint16),
`<key>.json` and, for VLA, `<key>.chunk.npy` (float32 K x D). `manifest.json` lists the shards.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.io import file_entry, npy_bytes, write_json

CHUNK_K = 5
CHUNK_D = 7


def sample_tokens(rng: np.random.Generator, length: int) -> tuple[np.ndarray, list[list[int]]]:
    """Random uint16 tokens starting with BOS 0, ending with SEP, one target span at the end."""
    tokens = rng.integers(4, 8196, size=length, dtype=np.uint16)
    tokens[0] = 0
    tokens[-1] = 8710
    start = int(rng.integers(1, length - 1))
    return tokens, [[start, length]]


def sample_members(kind: str, episode: str, step: int, split: str, tokens: np.ndarray,
                   targets: list[list[int]], chunk: np.ndarray | None) -> dict[str, bytes]:
    """The member payloads of one sample keyed by extension."""
    meta = {"kind": kind, "episode": episode, "step": step, "split": split,
            "instruction": f"do task of {episode}", "targets": targets}
    members = {"tokens.npy": npy_bytes(tokens), "json": json.dumps(meta, sort_keys=True).encode()}
    if chunk is not None:
        members["chunk.npy"] = npy_bytes(chunk.astype(np.float32))
    return members


def write_tar_gz(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """Write samples [(key, {ext: bytes})] as a deterministic gzip-compressed tar."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
    path.write_bytes(gzip.compress(raw.getvalue(), compresslevel=6, mtime=0))


def shard_samples(kind: str, index: int, count: int, rng: np.random.Generator,
                  length: tuple[int, int], val_every: int) -> list[tuple[str, dict[str, bytes]]]:
    """`count` samples of one shard; every `val_every`-th sample is in split `val`."""
    samples = []
    for step in range(count):
        episode = f"{kind}{index:03d}"
        tokens, targets = sample_tokens(rng, int(rng.integers(length[0], length[1] + 1)))
        chunk = rng.uniform(-1, 1, (CHUNK_K, CHUNK_D)) if kind == "vla" else None
        split = "val" if val_every and step % val_every == val_every - 1 else "train"
        key = f"{episode}__{step:06d}"
        samples.append((key, sample_members(kind, episode, step, split, tokens, targets, chunk)))
    return samples


def write_shard_set(out: Path, shards: list[tuple[str, list]]) -> dict[str, Any]:
    """Write [(kind, samples)] as numbered shards per kind plus `manifest.json`; return it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    entries, numbers = [], {"vla": 0, "wm": 0}
    for kind, samples in shards:
        path = out / f"{kind}-{numbers[kind]:06d}.tar.gz"
        numbers[kind] += 1
        write_tar_gz(path, samples)
        entries.append({**file_entry(path, out), "kind": kind, "samples": len(samples)})
    manifest = {"schema": 1, "shards": entries}
    write_json(out / "manifest.json", manifest)
    return manifest


def make_shards(out: Path, *, vla_shards: list[int], wm_shards: list[int], seed: int = 0,
                length: tuple[int, int] = (10, 30), val_every: int = 4) -> dict[str, Any]:
    """Write shards with the given per-shard sample counts into `out`; return the manifest."""
    rng = np.random.default_rng(seed)
    shards = [(kind, shard_samples(kind, index, count, rng, length, val_every))
              for kind, counts in (("vla", vla_shards), ("wm", wm_shards))
              for index, count in enumerate(counts)]
    return write_shard_set(out, shards)
