"""Check a shard directory against its manifest and the token layout; list every problem found.

First the records: the manifest's digest over every other field (and its canonical bytes), and
`stage.json` when present (its digest, every file it lists). A manifest whose digest does not match
is reported alone: its fields cannot be trusted to check the rest. Then re-hashes every shard (size and sha256), the stats copy, and re-reads every sample: member set and
dtypes; the token layout segment by segment (image blocks = start, grid tokens, rows of image code
ids each closed by a row end, end; action/state blocks = marker, exactly D/S bin ids within
num_bins, end marker; text ids outside every special range); the segment order of the query kind
(SPEC.md 6); targets = exactly the response plus its final SEP; the VLA chunk (K, D) float32 in
[-1, 1] and consistent with the action bins; per-shard and total counts.

The cut of a sequence into segments is the shared parser `shards.conversation.split_blocks` (the
one every reader uses, so verify checks what readers will see; it trusts nothing: an unreadable
block is a problem). Samples are read through the one shard codec (shards/format.py, strict: a
non-file tar member, a member twice, or a bad tar header checksum is a problem) and the set
through `ShardSet` (shards/shard_set.py). Every *check* here is verify's own, written from
SPEC.md independently of the builders and of the reader: segment contents, order and targets,
against the manifest's facts.

    from shards.verify import verify
    report = verify("out/demo/shards")      # report.problems == [] when everything is right
    rynn-pipe verify out/demo/shards         # exits non-zero on any problem
    rynn-pipe verify https://host/demo/shards   # a shard set at a URL (shards/remote.py)
"""

from __future__ import annotations

import json
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cache import MANIFEST as STAGE_RECORD
from pipeline.cache import output_problem
from pipeline.errors import DataError
from pipeline.io import dumps_json, sha256_bytes
from shards import vocab
from shards.conversation import VLA, split_blocks
from shards.format import (CHUNK, MANIFEST, META, SCHEMA, STATS, TOKENS, iter_samples,
                           manifest_digest, parse_members, tar_bytes)
from shards.shard_set import ShardSet
from shards.tokenizer import special_mask
from shards.bins import from_bins

MAX_PER_SHARD = 20   # problems reported per shard before summarizing


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    shards: int = 0
    samples: dict[str, int] = field(default_factory=dict)
    tokens: int = 0

    def summary(self) -> str:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.samples.items()))
        return f"{self.shards} shards, {kinds} samples, {self.tokens} tokens verified"


@dataclass(frozen=True)
class Layout:
    """What the manifest says a sample must look like."""

    side: int            # codes per image side
    action_dim: int
    state_dim: int
    history: int
    chunk: int
    num_bins: int
    wm_grids: tuple[tuple[int, int], ...] = ()   # non-square world-model code grids (published fit)
    per_camera_wm: bool = False                  # one image per world-model turn (published SO100)

    @classmethod
    def from_manifest(cls, m: dict[str, Any]) -> "Layout":
        c = m["conv"]
        return cls(side=int(m["vocab"]["codes_per_side"]), action_dim=int(c["action_dim"]),
                   state_dim=int(c["state_dim"]), history=int(c["history"]),
                   chunk=int(c["chunk"]), num_bins=int(c["num_bins"]),
                   wm_grids=tuple(tuple(g) for g in m.get("images", {}).get("wm_grids", [])),
                   per_camera_wm=c.get("wm_views") == "per_camera")

    def grids(self) -> set[tuple[int, int]]:
        return {(self.side, self.side), *self.wm_grids}


# ---------------------------------------------------------------------------------------------
# Token layout (pure).
# ---------------------------------------------------------------------------------------------

def image_block_problems(block: np.ndarray, grids: set[tuple[int, int]]) -> list[str]:
    h, w = vocab.block_grid(block[1], block[2])
    if (h, w) not in grids:
        allowed = sorted((vocab.grid_token(a * vocab.VQ_DOWNSAMPLE),
                          vocab.grid_token(b * vocab.VQ_DOWNSAMPLE)) for a, b in grids)
        return [f"image grid tokens {block[1:3].tolist()} not in {[list(g) for g in allowed]}"]
    rows = block[3:-1].reshape(h, w + 1)
    if (rows[:, -1] != vocab.IMAGE_ROW_END).any():
        return ["image row not closed by the row-end token"]
    if not vocab.is_image_code(rows[:, :-1]).all():
        return ["non-image-code id inside an image block"]
    return []


def bin_block_problems(block: np.ndarray, base: int, num_bins: int, what: str) -> list[str]:
    bins = block[1:-1] - base
    if ((bins < 1) | (bins > num_bins)).any():
        return [f"{what} block has ids outside its {num_bins} bins"]
    return []


def segment_problems(tokens: np.ndarray, segs: list[tuple[str, int, int]], lay: Layout
                     ) -> list[str]:
    out = []
    for kind, s, e in segs:
        block = tokens[s:e]
        if kind == "image":
            out += image_block_problems(block, lay.grids())
        elif kind == "action":
            out += bin_block_problems(block, vocab.ACTION_BIN_BASE, lay.num_bins, "action")
        elif kind == "state":
            out += bin_block_problems(block, vocab.STATE_BIN_BASE, lay.num_bins, "state")
        elif kind == "text" and special_mask(block).any():
            out.append(f"special id inside text at {s}..{e}")
    return out


def expected_order(kind: str, step: int, lay: Layout) -> list[str]:
    if kind == VLA:
        frames = min(lay.history, step + 1)
        return ["text", "state", *["image"] * (2 * frames), "sep", *["action"] * lay.chunk, "sep"]
    if lay.per_camera_wm:
        return ["text", "image", "action", "sep", "image", "sep"]
    return ["text", "image", "image", "action", "sep", "image", "image", "sep"]


def token_problems(tokens: np.ndarray, meta: dict[str, Any], lay: Layout) -> list[str]:
    """Layout problems of one sample's tokens and targets."""
    if tokens.dtype != np.uint16 or tokens.ndim != 1 or len(tokens) < 3:
        return [f"tokens must be 1-D uint16, got {tokens.dtype} {tokens.shape}"]
    tokens = tokens.astype(np.int64)
    if tokens[0] != vocab.BOS:
        return ["first token is not BOS"]
    segs, out = split_blocks(tokens, action_dim=lay.action_dim, state_dim=lay.state_dim)
    if out:
        return out
    out += segment_problems(tokens, segs, lay)
    order = [k for k, _, _ in segs]
    if order != expected_order(meta["kind"], int(meta["step"]), lay):
        out.append(f"segment order {order} is not a {meta['kind']} sample at step {meta['step']}")
    elif meta["targets"] != [[segs[order.index("sep")][2], len(tokens)]]:
        out.append(f"targets {meta['targets']} are not the response + final SEP")
    return out


def chunk_problems(chunk: np.ndarray | None, tokens: np.ndarray, lay: Layout) -> list[str]:
    if chunk is None:
        return ["VLA sample without chunk.npy"]
    if chunk.dtype != np.float32 or chunk.shape != (lay.chunk, lay.action_dim):
        return [f"chunk must be float32 {(lay.chunk, lay.action_dim)}, got {chunk.dtype} "
                f"{chunk.shape}"]
    if not np.isfinite(chunk).all() or np.abs(chunk).max() > 1:
        return ["chunk values outside [-1, 1]"]
    bins = vocab.action_bins_of(tokens)
    if bins.size != chunk.size:
        return ["chunk size does not match the action tokens"]
    half = 1.0 / (lay.num_bins - 1) + 1e-5
    if np.abs(from_bins(bins, lay.num_bins) - chunk.reshape(-1)).max() > half:
        return ["chunk does not match the action bins"]
    return []


# ---------------------------------------------------------------------------------------------
# Files.
# ---------------------------------------------------------------------------------------------

def sample_problems(key: str, members: dict[str, bytes], kind: str, lay: Layout,
                    splits: dict[str, str]) -> tuple[list[str], dict[str, Any]]:
    expected = {TOKENS, META, CHUNK} if kind == VLA else {TOKENS, META}
    if set(members) != expected:
        return [f"members {sorted(members)} != {sorted(expected)}"], {}
    s = parse_members(key, members)     # parse errors: DataError, reported by check_shard
    meta = s["meta"]
    out = []
    if meta.get("kind") != kind or f"{meta.get('episode')}__{int(meta.get('step', -1)):06d}" != key:
        out.append(f"json kind/episode/step {meta.get('kind')}/{meta.get('episode')}/"
                   f"{meta.get('step')} does not match the shard and key")
    if meta.get("split") != splits.get(meta.get("episode"), meta.get("split")) or \
            meta.get("split") not in ("train", "val"):
        out.append(f"split {meta.get('split')!r} does not match the manifest")
    if not isinstance(meta.get("instruction"), str):
        out.append("instruction is not a string")
    if out:
        return out, meta
    out += token_problems(s["tokens"], meta, lay)
    if kind == VLA and not out:
        out += chunk_problems(s["chunk"], s["tokens"], lay)
    return out, {**meta, "n_tokens": len(s["tokens"])}


def check_shard(shards: ShardSet, entry: dict[str, Any], lay: Layout, splits: dict[str, str],
                report: Report, keys: set[tuple[str, str]]) -> None:
    path, name = shards.path(entry), entry["path"]
    if not path.is_file():
        report.problems.append(f"{name}: listed in the manifest but missing")
        return
    raw = path.read_bytes()
    if len(raw) != entry["bytes"] or sha256_bytes(raw) != entry["sha256"]:
        report.problems.append(f"{name}: size or sha256 differs from the manifest")
    problems, counts = [], {"samples": 0, "tokens": 0, "splits": {}}
    try:
        for key, members in iter_samples(tar_bytes(name, raw), file=name, strict=True):
            if (entry["kind"], key) in keys:
                problems.append(f"{key}: duplicate sample key")
            keys.add((entry["kind"], key))
            found, meta = sample_problems(key, members, entry["kind"], lay, splits)
            problems += [f"{key}: {p}" for p in found]
            counts["samples"] += 1
            counts["tokens"] += meta.get("n_tokens", 0)
            sp = meta.get("split", "?")
            counts["splits"][sp] = counts["splits"].get(sp, 0) + 1
    except (OSError, EOFError, zlib.error, DataError, ValueError, KeyError,
            json.JSONDecodeError) as exc:
        problems.append(f"unreadable: {type(exc).__name__}: {exc}")
    report.problems += [f"{name}: {p}" for p in problems[:MAX_PER_SHARD]]
    if len(problems) > MAX_PER_SHARD:
        report.problems.append(f"{name}: ... {len(problems) - MAX_PER_SHARD} more problems")
    for k in ("samples", "tokens", "splits"):
        if k in entry and counts[k] != entry[k]:
            report.problems.append(f"{name}: {k} {counts[k]} != manifest {entry[k]}")
    report.samples[entry["kind"]] = report.samples.get(entry["kind"], 0) + counts["samples"]
    report.tokens += counts["tokens"]
    report.shards += 1


def check_listed_shard(shards: ShardSet, entry: dict[str, Any], lay: Layout,
                       splits: dict[str, str], report: Report, keys: set[tuple[str, str]]) -> None:
    """A listed shard; of a URL shard set it is downloaded and sha256-checked first (a mismatch is
    one problem and its samples are not read), then checked as a local shard."""
    try:
        with shards.local(entry):
            check_shard(shards, entry, lay, splits, report, keys)
    except DataError as exc:
        report.problems.append(f"{entry['path']}: {exc}")
        report.shards += 1


def check_files(root: Path, manifest: dict[str, Any], report: Report) -> None:
    listed = {e["path"] for e in manifest["shards"]}
    for p in sorted(root.iterdir()):
        if p.name.endswith((".tar", ".tar.gz")) and p.name not in listed:
            report.problems.append(f"{p.name}: shard file not listed in the manifest")
    stats = manifest.get("stats", {})
    path = root / stats.get("path", STATS)
    if not path.is_file() or sha256_bytes(path.read_bytes()) != stats.get("sha256"):
        report.problems.append(f"{path.name}: missing or sha256 differs from the manifest")


def check_totals(manifest: dict[str, Any], report: Report) -> None:
    for kind, t in manifest.get("totals", {}).items():
        if report.samples.get(kind, 0) != t["samples"]:
            report.problems.append(f"totals: {report.samples.get(kind, 0)} {kind} samples read, "
                                   f"manifest says {t['samples']}")


def verify(directory: str | Path) -> Report:
    """Every problem of the shard set in `directory` (an empty list when it is sound).
    `directory` may be a URL of a shard set (shards/remote.py): each shard is downloaded afresh
    (never from the cache) into a temporary directory, checked, and deleted."""
    with tempfile.TemporaryDirectory(prefix="rynn-verify-") as tmp:
        try:
            shards = ShardSet.open(directory, cache_dir=tmp, max_bytes=1)
        except DataError as exc:
            return Report(problems=[str(exc)])
        return _verify(shards)


def _verify(shards: ShardSet) -> Report:
    report = Report()
    manifest = shards.manifest
    try:
        lay = Layout.from_manifest(manifest)
    except (ValueError, KeyError, TypeError) as exc:
        report.problems.append(f"{MANIFEST}: unreadable or incomplete ({type(exc).__name__}: "
                               f"{exc})")
        return report
    if not check_records(shards.root, manifest, shards.manifest_bytes, report):
        return report                    # its fields cannot be trusted to check anything else
    if manifest.get("schema") != SCHEMA:
        report.problems.append(f"{MANIFEST}: schema {manifest.get('schema')!r} != {SCHEMA}")
    splits = shards.splits.get("episodes", {})
    keys: set[tuple[str, str]] = set()
    for entry in shards.entries():
        check_listed_shard(shards, entry, lay, splits, report, keys)
    check_files(shards.root, manifest, report)
    check_totals(manifest, report)
    return report


def check_records(root: Path, manifest: dict[str, Any], manifest_bytes: bytes,
                  report: Report) -> bool:
    """The manifest's own digest over every field (and its canonical bytes), and, when the set
    has one, the runner's `stage.json`: its digest and every file it lists. False when the
    manifest's fields are not the ones it was written with."""
    if not isinstance(manifest, dict) or "digest" not in manifest:
        report.problems.append(f"{MANIFEST}: no digest (written by an older rynn-pipe, or not a "
                               "manifest); rebuild with `rynn-pipe tokenize`")
        return False
    if manifest["digest"] != manifest_digest(manifest):
        report.problems.append(f"{MANIFEST}: a field was changed (its digest does not match; "
                               "rebuild with `rynn-pipe tokenize`)")
        return False
    if dumps_json(manifest).encode() != manifest_bytes:
        report.problems.append(f"{MANIFEST}: bytes differ from the canonical form it was written in")
    if (root / STAGE_RECORD).exists() or (root / STAGE_RECORD).is_symlink():
        problem = output_problem(root, fast=False)
        if problem is not None:
            report.problems.append(f"{STAGE_RECORD}: {problem}")
    return True

