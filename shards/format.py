"""The shard codec (schema 1, docs/ARCHITECTURE.md): one sample <-> tar members, shard names, the
deterministic tar member header, reading a shard's tar bytes back into samples, and the manifest's
vocabulary facts. Pure: bytes in, bytes or arrays out; no file I/O (shards/shard_set.py reads
files).

A sample with key `<episode_id>__<step:06d>` has members
    tokens.npy  uint16 (L,), BOS first and SEP last
    json        {"kind", "episode", "step", "split", "instruction", "targets": [[start, end]]}
    chunk.npy   float32 (K, D) in [-1, 1]  (VLA only)

    from shards.format import sample_members, sample_tar_bytes, iter_samples, decode_sample
    members = sample_members(sample, split="train", instruction="...")   # {"tokens.npy": b"..."}
    for key, members in iter_samples(tar_bytes(name, raw)):               # a shard read back
        sample = decode_sample(key, members)                              # a reader `Sample`

Reading is one lean 512-byte tar header walk (pax and GNU long names, ustar prefixes) and
`np.frombuffer` views for the npy payloads (C order, checked header): no copies; `tarfile` only
builds the headers written.
"""

from __future__ import annotations

import functools
import gzip
import json
import re
import tarfile
from typing import Any, Iterator, NamedTuple

import numpy as np

from pipeline.config import digest
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
_NPY_MAGIC = b"\x93NUMPY"
_NPY_DESCR = re.compile(rb"'descr':\s*'([^']+)'")
_NPY_SHAPE = re.compile(rb"'shape':\s*\(([^)]*)\)")
_NPY_FORTRAN = re.compile(rb"'fortran_order':\s*True")
_REGULAR, _PAX, _PAX_GLOBAL, _GNU_LONG_NAME = (48, 0), 120, 103, 76   # tar type flags


class Sample(NamedTuple):
    """One decoded sample. `tokens` is a read-only uint16 view into the decompressed shard."""
    key: str
    tokens: np.ndarray
    targets: list
    chunk: np.ndarray | None
    split: str


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


# ---------------------------------------------------------------- reading a shard back


def tar_bytes(name: str, raw: bytes) -> bytes:
    """The uncompressed tar of shard file `name` holding `raw` (`.tar.gz` or `.tar`)."""
    return gzip.decompress(raw) if name.endswith(".gz") else raw


def iter_samples(buf: bytes, *, file: str = "", strict: bool = False
                 ) -> Iterator[tuple[str, dict[str, memoryview]]]:
    """(key, {ext: payload}) of each sample of an uncompressed shard tar, in stored order
    (consecutive members with one key). `strict`: a member that is not a regular file is an error
    instead of being passed over."""
    key, members = None, {}
    for name, payload in tar_members(buf, file=file, strict=strict):
        name_key, ext = split_name(name)
        if name_key != key and members:
            yield key, members
            members = {}
        if ext in members:
            raise DataError(f"member {name!r} appears twice", file=file, key=name_key)
        key, members[ext] = name_key, payload
    if members:
        yield key, members


def tar_members(buf: bytes, *, file: str = "", partial: bool = False,
                strict: bool = False) -> Iterator[tuple[str, memoryview]]:
    """(name, payload) of each regular file of an uncompressed tar held in memory; `partial`: the
    buffer is a prefix of the tar, stop quietly at its end; `strict`: see `iter_samples`."""
    view, pos, total, long_name = memoryview(buf), 0, len(buf), None
    while pos + 512 <= total and buf[pos] != 0:
        size = int(buf[pos + 124:pos + 136].rstrip(b"\0 ") or b"0", 8)
        start, flag = pos + 512, buf[pos + 156]
        if strict and not _checksum_ok(buf, pos):
            raise DataError(f"tar header at byte {pos} fails its checksum", file=file)
        if start + size > total:
            if partial:
                return
            raise DataError("truncated tar member", file=file)
        if flag in _REGULAR:
            yield long_name or _header_name(buf, pos), view[start:start + size]
            long_name = None
        elif flag in (_PAX, _GNU_LONG_NAME):
            long_name = _long_name(flag, buf[start:start + size]) or long_name
        elif strict and flag != _PAX_GLOBAL:
            raise DataError(f"non-file tar member {_header_name(buf, pos)!r}", file=file)
        # otherwise directories, links and global pax headers carry no sample data
        pos = start + ((size + 511) & ~511)


def _checksum_ok(buf: bytes, pos: int) -> bool:
    """The header's stored checksum equals the sum of its bytes, the checksum field as spaces."""
    header = buf[pos:pos + BLOCK]
    stored = int(header[148:156].rstrip(b"\0 ") or b"0", 8)
    return stored == 8 * 32 + sum(header[:148]) + sum(header[156:])


def _header_name(buf: bytes, pos: int) -> str:
    name = buf[pos:pos + 100].split(b"\0", 1)[0].decode()
    if buf[pos + 345] == 0 or buf[pos + 257:pos + 262] != b"ustar":
        return name
    prefix = buf[pos + 345:pos + 500].split(b"\0", 1)[0].decode()
    return f"{prefix}/{name}"


def _long_name(flag: int, payload: bytes) -> str | None:
    """The file name carried by a GNU long-name ('L') or pax ('x') extended header."""
    if flag == _GNU_LONG_NAME:
        return payload.split(b"\0", 1)[0].decode()
    for record in payload.decode().splitlines():
        _, _, field = record.partition(" ")
        if field.startswith("path="):
            return field[5:]
    return None


def split_name(name: str) -> tuple[str, str]:
    """webdataset convention: key = path up to the first dot of the base name; ext = the rest."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:]


def decode_npy(data: memoryview | bytes, *, what: str = "npy") -> np.ndarray:
    """A read-only array viewing the payload of .npy bytes (no copy)."""
    if data[:6] != _NPY_MAGIC:
        raise DataError(f"{what}: not an .npy payload")
    start = 10 if data[6] == 1 else 12
    end = start + int.from_bytes(data[8:start], "little")
    layout = _npy_layout(bytes(data[start:end]))
    if layout is None:
        raise DataError(f"{what}: unsupported .npy header {bytes(data[start:end])!r}")
    dtype, dims, count = layout
    arr = np.frombuffer(data, dtype, count, end)
    return arr if len(dims) == 1 else arr.reshape(dims)


@functools.lru_cache(maxsize=8192)
def _npy_layout(header: bytes) -> tuple[np.dtype, tuple[int, ...], int] | None:
    """(dtype, shape, count) of a C-order .npy header dict; None if unsupported."""
    descr, shape = _NPY_DESCR.search(header), _NPY_SHAPE.search(header)
    if descr is None or shape is None or _NPY_FORTRAN.search(header):
        return None
    dims = tuple(int(d) for d in shape.group(1).split(b",") if d.strip())
    return np.dtype(descr.group(1).decode()), dims, int(np.prod(dims, dtype=np.int64))


def parse_members(key: str, members: dict[str, Any], *, file: str = "") -> dict[str, Any]:
    """{"key", "meta", "tokens", "chunk"} of a sample read back from its members, unchecked
    beyond parsing (`rynn-pipe verify` and `inspect` judge the rest themselves)."""
    meta, tokens, chunk = _parse(key, members, file)
    return {"key": key, "meta": meta, "tokens": tokens, "chunk": chunk}


def decode_sample(key: str, members: dict[str, Any], *, file: str = "") -> Sample:
    """A training `Sample` from its members: tokens 1-D uint16, a 2-D chunk for VLA."""
    meta, tokens, chunk = _parse(key, members, file)
    if tokens.dtype != np.uint16 or tokens.ndim != 1:
        raise DataError(f"tokens must be 1-D uint16, got {tokens.dtype} {tokens.shape}",
                        file=file, key=key)
    if meta.get("kind") == VLA and (chunk is None or chunk.ndim != 2):
        raise DataError("VLA sample needs a 2-D chunk.npy", file=file, key=key)
    return Sample(key, tokens, meta["targets"], chunk, meta["split"])


def _parse(key: str, members: dict[str, Any], file: str
           ) -> tuple[dict[str, Any], np.ndarray, np.ndarray | None]:
    """(meta, tokens, chunk or None) of a sample's members (npy payloads as read-only views)."""
    if TOKENS not in members or META not in members:
        raise DataError(f"sample lacks {TOKENS} or {META} (has {sorted(members)})", file=file,
                        key=key)
    chunk = members.get(CHUNK)
    return (json.loads(bytes(members[META])), decode_npy(members[TOKENS], what=f"{key}.{TOKENS}"),
            None if chunk is None else decode_npy(chunk, what=f"{key}.{CHUNK}"))


def decode_shard(buf: bytes, split: str = "all", *, file: str = "") -> list[Sample]:
    """Every sample of an uncompressed shard tar in stored order, keeping those of `split`."""
    samples = [decode_sample(key, members, file=file)
               for key, members in iter_samples(buf, file=file)]
    return samples if split == "all" else [s for s in samples if s.split == split]


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
    return digest({k: v for k, v in manifest.items() if k != "digest"})
