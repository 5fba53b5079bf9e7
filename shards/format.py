"""The shard sample format (schema 1, docs/ARCHITECTURE.md): one sample <-> tar members, shard
names, the deterministic tar member header, and the manifest's vocabulary facts. Pure: no file I/O.

A sample with key `<episode_id>__<step:06d>` has members
    tokens.npy  uint16 (L,), BOS first and SEP last
    json        {"kind", "episode", "step", "split", "instruction", "targets": [[start, end]]}
    chunk.npy   float32 (K, D) in [-1, 1]  (VLA only)

    from shards.format import sample_members, parse_members, shard_name
    members = sample_members(sample, split="train")     # {"tokens.npy": b"...", "json": ...}
"""

from __future__ import annotations

import io
import json
import tarfile
from typing import Any

import numpy as np

from pipeline.errors import DataError
from pipeline.io import npy_bytes
from shards import vocab
from shards.conversation import KINDS, VLA, ConvSample

SCHEMA = 1
MANIFEST = "manifest.json"
STATS = "stats.json"
TOKENS, META, CHUNK = "tokens.npy", "json", "chunk.npy"
SUFFIX = {"gz": ".tar.gz", "none": ".tar"}
BLOCK = 512
END_OF_ARCHIVE = bytes(2 * BLOCK)


def sample_key(episode: str, step: int) -> str:
    """`<episode>__<step:06d>`; webdataset keys end at the first dot, so ids must have none."""
    if "." in episode or "/" in episode:
        raise DataError("episode id contains '.' or '/', which would break webdataset keys",
                        episode=episode)
    return f"{episode}__{step:06d}"


def shard_name(kind: str, index: int, compression: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown shard kind {kind!r}")
    return f"{kind}-{index:06d}{SUFFIX[compression]}"


def sample_members(sample: ConvSample, split: str, instruction: str) -> dict[str, bytes]:
    """The tar member payloads of one sample, keyed by extension, in stored order."""
    tokens = np.asarray(sample.tokens)
    if tokens.min() < 0 or tokens.max() >= vocab.VOCAB_SIZE:
        raise DataError(f"token ids outside 0..{vocab.VOCAB_SIZE - 1}", episode=sample.episode)
    meta = {"kind": sample.kind, "episode": sample.episode, "step": int(sample.step),
            "split": split, "instruction": instruction, "targets": sample.targets}
    members = {TOKENS: npy_bytes(tokens.astype(np.uint16)),
               META: json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()}
    if sample.kind == VLA:
        members[CHUNK] = npy_bytes(np.asarray(sample.chunk, dtype=np.float32))
    return members


def parse_members(key: str, members: dict[str, bytes]) -> dict[str, Any]:
    """{"key", "meta", "tokens", "chunk"} of a sample read back from its members."""
    if TOKENS not in members or META not in members:
        raise DataError(f"sample lacks {TOKENS} or {META} (has {sorted(members)})", key=key)
    out = {"key": key, "meta": json.loads(members[META]), "chunk": None,
           "tokens": np.load(io.BytesIO(members[TOKENS]), allow_pickle=False)}
    if CHUNK in members:
        out["chunk"] = np.load(io.BytesIO(members[CHUNK]), allow_pickle=False)
    return out


def member_bytes(name: str, data: bytes) -> bytes:
    """One deterministic tar member (pax header when the name needs it, payload, padding)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    return header + data + bytes(-len(data) % BLOCK)


def sample_tar_bytes(key: str, members: dict[str, bytes]) -> bytes:
    return b"".join(member_bytes(f"{key}.{ext}", data) for ext, data in members.items())


def vocab_facts(resolution: int) -> dict[str, Any]:
    """What the manifest records about the vocabulary layout."""
    names = ("BOS", "IMAGE_CODE_FIRST", "IMAGE_CODE_LAST", "IMAGE_END", "IMAGE_START", "SEP",
             "IMAGE_ROW_END", "IMAGE_GRID_BASE", "ACTION_START", "ACTION_BIN_BASE", "ACTION_END",
             "STATE_START", "STATE_BIN_BASE", "STATE_END")
    return {"vocab_size": vocab.VOCAB_SIZE, "resolution": resolution,
            "codes_per_side": resolution // vocab.VQ_DOWNSAMPLE,
            "grid_token": vocab.grid_token(resolution),
            "tokens_per_image": vocab.image_block_len(resolution),
            "special_ids": {n.lower(): getattr(vocab, n) for n in names}}


def manifest_digest(manifest: dict[str, Any]) -> str:
    """The digest a manifest carries over every other field it holds (`rynn-pipe verify`
    recomputes it, so no field that describes the data can change unnoticed)."""
    from pipeline.config import digest
    return digest({k: v for k, v in manifest.items() if k != "digest"})
