"""Training reader for a shard set: mixed VLA / world-model batches, deterministic for a seed, split
by rank, prefetched in background threads, exactly resumable.

    reader = ShardReader("out/demo/shards", batch_size=8, rank=rank, world_size=world)
    reader.load_state_dict(ckpt["data"])       # optional: resume exactly where a run stopped
    for batch in reader:                       # the rest of the current epoch (len(reader) batches)
        ...
        ckpt["data"] = reader.state_dict()

Order. Each kind ("vla", "wm") is a stream that runs through stream epochs. In stream epoch e the
stream's shards are permuted with rng([seed, SHARDS, kind, e]); their samples of the selected split,
concatenated, form one global sequence of N samples (counts come from the manifest, so planning
reads nothing). Rank r takes the contiguous range [r*m, (r+1)*m) with m = N // world_size: every
rank gets exactly m samples, ranges are disjoint, and only the shards at a range's two ends are read
by two ranks (reading cost stays about 1x; at most world_size - 1 samples per stream epoch are
dropped). A range is cut into blocks of `shuffle_shards` consecutive shards; a block's samples are
permuted with rng([seed, BLOCK, kind, e, block]) and consumed in that order. A stream that runs out
goes on with its next stream epoch.

Batches. Slot i of batch b of reader epoch E is a VLA sample with probability `mix`, drawn from
rng([seed, KINDS, E, b]); the draw ignores the rank, so every rank's streams advance in step and the
state is the same on every rank. Each slot takes the next sample of its kind's stream. A reader
epoch is a fixed number of batches, the same on every rank: floor(sum of m over the streams drawn
from / batch_size), i.e. about one pass over this rank's share of the selected split.

Resume. `state_dict()` is the reader epoch, the batches of it handed out, and each stream's
(epoch, position) after the last batch handed out; `load_state_dict()` restores it. Skipping is
arithmetic on manifest counts: only the block holding the position is read.

URLs. `root` (a directory or an open `ShardSet`, shards/shard_set.py) may be the URL of a shard set
(`http(s)://`, or any fsspec URL): the manifest is read first and each shard is fetched into a
bounded local cache and sha256-checked against the manifest before its samples are used
(shards/remote.py); order, resume and per-rank counts are the same.

Speed. A shard is read whole (it is size-bounded): one gzip decompression (which releases the GIL,
so loader threads overlap), a lean 512-byte tar header walk, `np.frombuffer` views for the npy
payloads. Shards of the next block load in a thread pool while the current one is consumed, and a
producer thread keeps `prefetch` collated batches ready. Multi-process DataLoader workers are not
needed and not supported.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from pipeline.errors import DataError
from pipeline.threads import background, local_processes, threads_per_process
from shards import vocab
from shards.format import KINDS, Sample
from shards.shard_set import ShardSet, peek_chunk_shape

SPLITS = ("train", "val", "all")
STATE_SCHEMA = 1
# rng tags keep the three random streams of the order apart
_TAG_SHARDS, _TAG_BLOCK, _TAG_KINDS = 1, 2, 3


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    entry: dict[str, Any]   # the manifest's entry (path, sha256: a changed shard is refused)
    path: Path
    kind: str
    samples: int         # samples of the selected split
    total: int           # samples of every split


# ---------------------------------------------------------------- the shard set


def load_shard_infos(shards: ShardSet, split: str, kinds: tuple[str, ...]
                     ) -> dict[str, list[ShardInfo]]:
    """Shards per kind from the manifest, with per-split counts (scanned if not listed)."""
    infos: dict[str, list[ShardInfo]] = {k: [] for k in kinds}
    for kind in kinds:
        for entry in shards.entries(kind):
            count = _split_count(shards, entry, split)
            infos[kind].append(ShardInfo(entry, shards.path(entry), kind, count,
                                         entry["samples"]))
    return infos


def _split_count(shards: ShardSet, entry: dict[str, Any], split: str) -> int:
    if split == "all":
        return int(entry["samples"])
    if "splits" in entry:
        return int(entry["splits"].get(split, 0))
    return len(shards.read(entry, split))      # manifest without per-split counts: count once


# ---------------------------------------------------------------- one stream (one kind)


class _Stream:
    """The endless, rank-split, shuffled sample sequence of one kind (see the module docstring)."""

    def __init__(self, kind: str, shards: list[ShardInfo], reader: "ShardReader") -> None:
        self.kind, self.kind_id, self.shards, self.r = kind, KINDS.index(kind), shards, reader
        self.total = sum(s.samples for s in shards)
        self.per_rank = self.total // reader.world_size

    def plan(self, epoch: int) -> list[list[tuple[int, int, int]]]:
        """This rank's blocks of stream epoch `epoch`: lists of (shard index, lo, hi) segments."""
        r = self.r
        order = np.arange(len(self.shards))
        if r.shuffle:
            order = np.random.default_rng([r.seed, _TAG_SHARDS, self.kind_id, epoch]).permutation(
                len(self.shards))
        start, end = r.rank * self.per_rank, (r.rank + 1) * self.per_rank
        segments, offset = [], 0
        for i in order.tolist():
            n = self.shards[i].samples
            lo, hi = max(start - offset, 0), min(end - offset, n)
            if lo < hi:
                segments.append((i, lo, hi))
            offset += n
        w = r.shuffle_shards
        return [segments[j:j + w] for j in range(0, len(segments), w)]

    def _specs(self, epoch: int, pos: int) -> Iterator[tuple[int, int, list, int]]:
        """(epoch, block index, segments, samples to skip) from position `pos` of `epoch` on."""
        skip = pos
        while True:
            for index, segments in enumerate(self.plan(epoch)):
                size = sum(hi - lo for _, lo, hi in segments)
                if skip < size:
                    yield epoch, index, segments, skip
                    skip = 0
                else:
                    skip -= size
            epoch += 1

    def _submit(self, spec: tuple) -> tuple[tuple, list[Future]]:
        futures = [self.r._load(self.shards[i]) for i, _, _ in spec[2]]
        return spec, futures

    def _block(self, spec: tuple, futures: list[Future]) -> list[Sample]:
        epoch, index, segments, skip = spec
        samples: list[Sample] = []
        for (i, lo, hi), future in zip(segments, futures):
            shard, info = future.result(), self.shards[i]
            if len(shard) != info.samples:
                raise DataError(f"shard has {len(shard)} samples of split {self.r.split!r}, the "
                                f"manifest says {info.samples}", file=str(info.path))
            samples.extend(shard[lo:hi])
        if self.r.shuffle:
            rng = np.random.default_rng([self.r.seed, _TAG_BLOCK, self.kind_id, epoch, index])
            samples = [samples[j] for j in rng.permutation(len(samples)).tolist()]
        return samples[skip:]

    def samples(self, epoch: int, pos: int) -> Iterator[Sample]:
        """Samples from (epoch, pos) on, forever. The first block starts loading now, each next
        block while the one before it is consumed."""
        specs = self._specs(epoch, pos)
        return self._consume(specs, self._submit(next(specs)))

    def _consume(self, specs: Iterator[tuple], ahead: tuple) -> Iterator[Sample]:
        while True:
            current, ahead = ahead, self._submit(next(specs))
            yield from self._block(*current)


# ---------------------------------------------------------------- batches


def collate(samples: list[Sample], is_vla: np.ndarray, chunk_shape: tuple[int, int],
            pad_multiple: int = 8) -> dict[str, Any]:
    """The documented batch: right padding with 0 / -100 / 0 to the longest sample, rounded up."""
    lengths = np.array([len(s.tokens) for s in samples])
    width = -(-int(lengths.max()) // pad_multiple) * pad_multiple
    mask = np.arange(width) < lengths[:, None]
    ids = np.zeros(mask.shape, np.int64)
    ids[mask] = np.concatenate([s.tokens for s in samples])
    labels = np.full(mask.shape, vocab.IGNORE_INDEX, np.int64)
    for row, s in enumerate(samples):
        for a, b in s.targets:
            if not 0 <= a < b <= lengths[row]:
                raise DataError(f"target span [{a}, {b}) outside 0..{lengths[row]}", key=s.key)
            labels[row, a:b] = ids[row, a:b]
    return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
            "attention_mask": torch.from_numpy(mask.astype(np.int64)),
            "is_vla": torch.from_numpy(is_vla.copy()),
            "actions": torch.from_numpy(_actions(samples, is_vla, chunk_shape)),
            "keys": [s.key for s in samples]}


def _actions(samples: list[Sample], is_vla: np.ndarray, chunk_shape: tuple[int, int]) -> np.ndarray:
    """(B, K, D) float32: the VLA rows' chunks, zeros for world-model rows."""
    actions = np.zeros((len(samples), *chunk_shape), np.float32)
    for row in np.flatnonzero(is_vla).tolist():
        chunk = samples[row].chunk
        if chunk is None or chunk.shape != chunk_shape:
            raise DataError(f"action chunk {None if chunk is None else chunk.shape} is not "
                            f"{chunk_shape}", key=samples[row].key)
        actions[row] = chunk
    return actions


@dataclasses.dataclass
class _Cursor:
    epoch: int = 0
    batch: int = 0
    streams: dict[str, list[int]] = dataclasses.field(default_factory=dict)

    def copy(self) -> "_Cursor":
        return _Cursor(self.epoch, self.batch, {k: list(v) for k, v in self.streams.items()})


class ShardReader:
    """Iterable of training batches over a shard directory. See the module docstring."""

    def __init__(self, root: "str | Path | ShardSet", *, batch_size: int, split: str = "train",
                 mix: float | None = None, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, prefetch: int = 2, kinds: tuple[str, ...] = KINDS,
                 shuffle_shards: int = 2, pad_multiple: int = 8,
                 threads: int | None = None) -> None:
        threads = reader_threads() if threads is None else threads
        _validate(batch_size, split, mix, rank, world_size, prefetch, kinds, shuffle_shards,
                  pad_multiple, threads)
        self.shard_set = ShardSet.open(root)          # a URL: shards/remote.py
        self.root = self.shard_set.root
        self.batch_size, self.split, self.seed = batch_size, split, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.prefetch, self.kinds = prefetch, tuple(kinds)
        self.shuffle_shards, self.pad_multiple = shuffle_shards, pad_multiple
        infos = load_shard_infos(self.shard_set, split, self.kinds)
        self.streams = {k: _Stream(k, infos[k], self) for k in self.kinds}
        self.mix = self._resolve_mix(mix)
        self.drawn = [k for k in self.kinds if self._weight(k) > 0]
        for k in self.drawn:
            if self.streams[k].per_rank == 0:
                raise DataError(f"stream {k!r} has {self.streams[k].total} samples in split "
                                f"{split!r}, fewer than world_size={world_size}", file=str(root))
        self.batches_per_epoch = sum(self.streams[k].per_rank for k in self.drawn) // batch_size
        if self.batches_per_epoch == 0:
            raise DataError(f"fewer samples per rank than batch_size={batch_size}", file=str(root))
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="shard-load")
        self._state = _Cursor(streams={k: [0, 0] for k in self.kinds})
        self.chunk_shape = self._find_chunk_shape()

    # -- configuration helpers

    def _resolve_mix(self, mix: float | None) -> float:
        """P(slot is VLA): given, or the natural ratio of the streams' sizes in the split."""
        if len(self.kinds) == 1:
            only_vla = float(self.kinds[0] == "vla")
            if mix is not None and mix != only_vla:
                raise ValueError(f"mix={mix} needs both kinds; kinds={self.kinds}")
            return only_vla
        if mix is not None:
            return float(mix)
        sizes = {k: self.streams[k].total for k in KINDS}
        if sum(sizes.values()) == 0:
            raise DataError(f"no samples in split {self.split!r}", file=str(self.root))
        return sizes["vla"] / (sizes["vla"] + sizes["wm"])

    def _weight(self, kind: str) -> float:
        return self.mix if kind == "vla" else 1.0 - self.mix

    def _find_chunk_shape(self) -> tuple[int, int]:
        """(K, D) of the VLA action chunks, from the first VLA shard; (0, 0) without VLA."""
        if "vla" not in self.drawn:
            return (0, 0)
        for info in self.streams["vla"].shards:
            with self.shard_set.local(info.entry) as path:
                shape = peek_chunk_shape(path)
            if shape is not None:
                return shape
        raise DataError("no VLA sample has an action chunk", file=str(self.root))

    def _load(self, info: ShardInfo) -> Future:
        return self._pool.submit(self._read, info)

    def _read(self, info: ShardInfo) -> list[Sample]:
        return self.shard_set.read(info.entry, self.split)

    # -- iteration

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """The remaining batches of the current epoch (a finished epoch moves to the next)."""
        return self._run(forever=False)

    def forever(self) -> Iterator[dict[str, Any]]:
        """Batches without end, crossing epochs (prefetch runs across the boundary)."""
        return self._run(forever=True)

    def _slot_kinds(self, epoch: int, batch: int) -> list[str]:
        if len(self.drawn) == 1:
            return [self.drawn[0]] * self.batch_size
        rng = np.random.default_rng([self.seed, _TAG_KINDS, epoch, batch])
        return ["vla" if u < self.mix else "wm" for u in rng.random(self.batch_size).tolist()]

    def _batches(self, cursor: _Cursor, forever: bool) -> Iterator[tuple[dict, _Cursor]]:
        """(batch, state after it) from `cursor` on: the whole order, synchronously."""
        cursor = cursor.copy()
        if cursor.batch >= self.batches_per_epoch:
            cursor.epoch, cursor.batch = cursor.epoch + 1, 0
        streams = {k: self.streams[k].samples(*cursor.streams[k]) for k in self.drawn}
        while True:
            kinds = self._slot_kinds(cursor.epoch, cursor.batch)
            samples = [next(streams[k]) for k in kinds]
            for k in kinds:
                self._advance(cursor.streams[k], k)
            cursor.batch += 1
            is_vla = np.array([k == "vla" for k in kinds])
            yield collate(samples, is_vla, self.chunk_shape, self.pad_multiple), cursor.copy()
            if cursor.batch == self.batches_per_epoch:
                if not forever:
                    return
                cursor.epoch, cursor.batch = cursor.epoch + 1, 0

    def _advance(self, position: list[int], kind: str) -> None:
        position[1] += 1
        if position[1] == self.streams[kind].per_rank:
            position[0], position[1] = position[0] + 1, 0

    def _run(self, forever: bool) -> Iterator[dict[str, Any]]:
        source = self._batches(self._state, forever)
        if self.prefetch > 0:
            source = background(source, self.prefetch, name="shard-reader")
        for batch, state in source:
            self._state = state
            yield batch

    # -- resume

    def state_dict(self) -> dict[str, Any]:
        """The position after the last batch handed out (identical on every rank)."""
        s = self._state
        return {"schema": STATE_SCHEMA, "epoch": s.epoch, "batch": s.batch,
                "streams": {k: list(v) for k, v in s.streams.items()}, "config": self._config()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("schema") != STATE_SCHEMA:
            raise ValueError(f"reader state schema {state.get('schema')} != {STATE_SCHEMA}")
        if state["config"] != self._config():
            raise ValueError(f"reader state was saved with {state['config']}, this reader is "
                             f"{self._config()}: build the reader with the saved settings")
        self._state = _Cursor(int(state["epoch"]), int(state["batch"]),
                              {k: [int(e), int(p)] for k, (e, p) in state["streams"].items()})

    def _config(self) -> dict[str, Any]:
        return {"seed": self.seed, "batch_size": self.batch_size, "split": self.split,
                "world_size": self.world_size, "shuffle": self.shuffle, "mix": self.mix,
                "kinds": list(self.kinds), "shuffle_shards": self.shuffle_shards,
                "samples": {k: self.streams[k].total for k in self.kinds}}

    def close(self) -> None:
        """Cancel queued shard reads and wait for the ones running (at most one shard each), so
        no thread of a closed reader still holds a shard of the cache."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "ShardReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def reader_threads() -> int:
    """Default shard-loading threads: 2 (a block's shards), within this process's thread budget."""
    return min(2, threads_per_process(local_processes()))


def _validate(batch_size: int, split: str, mix: float | None, rank: int, world_size: int,
              prefetch: int, kinds: tuple[str, ...], shuffle_shards: int, pad_multiple: int,
              threads: int) -> None:
    checks = [
        (batch_size >= 1, f"batch_size must be >= 1, got {batch_size}"),
        (split in SPLITS, f"split must be one of {SPLITS}, got {split!r}"),
        (mix is None or 0.0 <= mix <= 1.0, f"mix must be in [0, 1] or None, got {mix}"),
        (world_size >= 1 and 0 <= rank < world_size, f"need 0 <= rank < world_size, got "
                                                      f"rank={rank} world_size={world_size}"),
        (prefetch >= 0, f"prefetch must be >= 0, got {prefetch}"),
        (len(kinds) > 0 and len(set(kinds)) == len(kinds) and set(kinds) <= set(KINDS),
         f"kinds must be distinct values of {KINDS}, got {kinds}"),
        (shuffle_shards >= 1, f"shuffle_shards must be >= 1, got {shuffle_shards}"),
        (pad_multiple >= 1, f"pad_multiple must be >= 1, got {pad_multiple}"),
        (threads >= 1, f"threads must be >= 1, got {threads}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def load_hf_dataset(root: str | Path, kind: str = "vla", cache_dir: str | Path | None = None):
    """The `kind` shards as a Hugging Face `datasets.Dataset` (its `webdataset` builder)."""
    import datasets  # slow to import; only this export needs it

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    shards = ShardSet.open(root)
    files = [str(shards.path(e)) for e in shards.entries(kind)]
    if not files:
        raise DataError(f"no {kind} shards in the manifest", file=str(root))
    return datasets.load_dataset("webdataset", data_files={"train": files}, split="train",
                                 cache_dir=None if cache_dir is None else str(cache_dir))
