"""`python -m bench reader`: read throughput of the training reader (`shards.reader.ShardReader`)
against a raw numpy memmap of the same tokens (the limit) and one pickle per sample (the published
format: a dict of Python lists `token` and `label` per file), plus bytes on disk per token.

    .venv/bin/python -m bench.bench_reader [--samples 16000] [--batch 32]

All three build the same batches (int64 input_ids / labels / attention_mask padded to the batch max)
from the same synthetic samples of about 1.2k tokens (4 image blocks of 276 random codes, text,
state and action blocks). Files are freshly written, so they are read from the page cache.
"""

from __future__ import annotations

import argparse
import os
import pickle
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from pipeline.io import sha256_bytes
from shards import vocab
from shards.reader import ShardReader
from shards.shard_set import read_shard
from bench.shard_factory import sample_members, write_shard_set

GOAL_SPEEDUP, GOAL_BYTES_PER_TOKEN = 2.0, 2.5
SAMPLES_PER_SHARD = 500
K, D = 5, 7


def image_block(rng: np.random.Generator, side_px: int = 256) -> np.ndarray:
    """[start, grid, grid, rows of random codes each + row end, end]: 276 tokens at 256 px."""
    n = side_px // vocab.VQ_DOWNSAMPLE
    rows = rng.integers(vocab.IMAGE_CODE_FIRST, vocab.IMAGE_CODE_LAST + 1, (n, n))
    rows = np.concatenate([rows, np.full((n, 1), vocab.IMAGE_ROW_END)], axis=1)
    grid = vocab.grid_token(side_px)
    return np.concatenate([[vocab.IMAGE_START, grid, grid], rows.ravel(), [vocab.IMAGE_END]])


def vla_sequence(rng: np.random.Generator, side_px: int = 256) -> tuple[np.ndarray, list[list[int]]]:
    """BOS, text, state, 4 images, SEP | K action blocks, SEP: ~1.2k tokens, targets = response."""
    human = [[vocab.BOS], rng.integers(16100, 65536, 24), vocab.state_block(rng.integers(1, 257, 8))]
    human += [image_block(rng, side_px) for _ in range(4)] + [[vocab.SEP]]
    response = [vocab.action_block(rng.integers(1, 257, D)) for _ in range(K)] + [[vocab.SEP]]
    head, tail = np.concatenate(human), np.concatenate(response)
    return np.concatenate([head, tail]).astype(np.uint16), [[len(head), len(head) + len(tail)]]


def wm_sequence(rng: np.random.Generator, side_px: int = 256) -> tuple[np.ndarray, list[list[int]]]:
    """BOS, prompt, 2 images, action, SEP | 2 images, SEP."""
    human = [[vocab.BOS], rng.integers(16100, 65536, 24), image_block(rng, side_px),
             image_block(rng, side_px),
             vocab.action_block(rng.integers(1, 257, D)), [vocab.SEP]]
    response = [image_block(rng, side_px), image_block(rng, side_px), [vocab.SEP]]
    head, tail = np.concatenate(human), np.concatenate(response)
    return np.concatenate([head, tail]).astype(np.uint16), [[len(head), len(head) + len(tail)]]


def make_samples(n: int, seed: int = 0) -> list[tuple[str, str, np.ndarray, list, np.ndarray]]:
    """(kind, key, tokens, targets, chunk): two thirds VLA, one third world model."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        kind = "wm" if i % 3 == 2 else "vla"
        tokens, targets = (vla_sequence if kind == "vla" else wm_sequence)(rng)
        chunk = rng.uniform(-1, 1, (K, D)).astype(np.float32)
        samples.append((kind, f"ep{i // 100:05d}__{i:06d}", tokens, targets, chunk))
    return samples


def write_shards(out: Path, samples: list) -> None:
    shards = []
    for kind in ("vla", "wm"):
        members = [(key, sample_members(kind, key.split("__")[0], i, "train", tokens, targets,
                                        chunk if kind == "vla" else None))
                   for i, (k, key, tokens, targets, chunk) in enumerate(samples) if k == kind]
        shards += [(kind, members[j:j + SAMPLES_PER_SHARD])
                   for j in range(0, len(members), SAMPLES_PER_SHARD)]
    write_shard_set(out, shards)


def write_memmap(out: Path, samples: list) -> tuple[np.ndarray, np.ndarray]:
    """All tokens in one uint16 file; returns (memmap, offsets)."""
    lengths = np.array([len(s[2]) for s in samples])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    np.concatenate([s[2] for s in samples]).tofile(out / "tokens.u16")
    return np.memmap(out / "tokens.u16", dtype=np.uint16, mode="r"), offsets


def write_pickles(out: Path, samples: list) -> None:
    """The published layout: one pickle per sample with Python lists of tokens and labels."""
    out.mkdir()
    for kind, key, tokens, targets, chunk in samples:
        labels = np.full(len(tokens), vocab.IGNORE_INDEX, np.int64)
        for a, b in targets:
            labels[a:b] = tokens[a:b]
        with open(out / f"{key}.pkl", "wb") as f:
            pickle.dump({"token": tokens.tolist(), "label": labels.tolist()}, f)


def pad_batch(rows: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, ...]:
    """(ids, labels) rows -> padded int64 input_ids, labels, attention_mask."""
    width = -(-max(len(r[0]) for r in rows) // 8) * 8
    ids = np.zeros((len(rows), width), np.int64)
    labels = np.full((len(rows), width), vocab.IGNORE_INDEX, np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for i, (tok, lab) in enumerate(rows):
        ids[i, :len(tok)], labels[i, :len(tok)], mask[i, :len(tok)] = tok, lab, 1
    return ids, labels, mask


def memmap_batches(mm: np.ndarray, offsets: np.ndarray, samples: list,
                   batch: int) -> Iterator[tuple]:
    order = np.random.default_rng(0).permutation(len(samples))
    for j in range(0, len(order) - batch + 1, batch):
        rows = []
        for i in order[j:j + batch].tolist():
            tok = np.asarray(mm[offsets[i]:offsets[i + 1]])
            lab = np.full(len(tok), vocab.IGNORE_INDEX, np.int64)
            for a, b in samples[i][3]:
                lab[a:b] = tok[a:b]
            rows.append((tok, lab))
        yield pad_batch(rows)


def pickle_batches(folder: Path, samples: list, batch: int) -> Iterator[tuple]:
    order = np.random.default_rng(0).permutation(len(samples))
    for j in range(0, len(order) - batch + 1, batch):
        rows = []
        for i in order[j:j + batch].tolist():
            with open(folder / f"{samples[i][1]}.pkl", "rb") as f:
                d = pickle.load(f)
            rows.append((np.array(d["token"], np.int64), np.array(d["label"], np.int64)))
        yield pad_batch(rows)


def timed(batches: Callable[[], Iterator], batch: int) -> tuple[int, float, float]:
    """(samples read, seconds for one pass, seconds to the first batch)."""
    t0 = time.perf_counter()
    it = batches()
    next(it)
    first = time.perf_counter() - t0
    n = batch + sum(batch for _ in it)
    return n, time.perf_counter() - t0, first


def disk_bytes(paths: list[Path]) -> tuple[int, int]:
    """(apparent bytes, allocated bytes) of files."""
    stats = [p.stat() for p in paths]
    return sum(s.st_size for s in stats), sum(s.st_blocks * 512 for s in stats)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16000)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-reader-") as tmp:
        run(Path(tmp), args.samples, args.batch)


def run(tmp: Path, n: int, batch: int) -> None:
    t0 = time.perf_counter()
    samples = make_samples(n)
    tokens = sum(len(s[2]) for s in samples)
    write_shards(tmp / "shards", samples)
    mm, offsets = write_memmap(tmp, samples)
    write_pickles(tmp / "pkl", samples)
    print(f"{n} samples, {tokens / n:.0f} tokens each on average, batch {batch}; "
          f"written in {time.perf_counter() - t0:.1f} s")
    reader = ShardReader(tmp / "shards", batch_size=batch, split="all", seed=0)
    results = {
        "shard reader": timed(lambda: iter(reader), batch),
        "numpy memmap": timed(lambda: memmap_batches(mm, offsets, samples, batch), batch),
        "pickle/sample": timed(lambda: pickle_batches(tmp / "pkl", samples, batch), batch),
    }
    reader.close()
    report(results, tokens / n)
    report_hash(tmp / "shards")
    report_disk(tmp, tokens)


def report(results: dict[str, tuple[int, float, float]], tokens_per_sample: float) -> None:
    rates = {name: count / secs for name, (count, secs, _) in results.items()}
    for name, rate in rates.items():
        mb = rate * tokens_per_sample * 2 / 1e6
        print(f"  {name:14s} {rate:9.0f} samples/s  {mb:7.1f} MB/s of uint16 tokens  "
              f"(first batch after {results[name][2] * 1000:.0f} ms)")
    speedup = rates["shard reader"] / rates["pickle/sample"]
    print(f"  reader / pickle   = {speedup:.2f}x  (goal >= {GOAL_SPEEDUP}x: "
          f"{'ok' if speedup >= GOAL_SPEEDUP else 'MISSED'})")
    print(f"  reader / memmap   = {rates['shard reader'] / rates['numpy memmap']:.2f}x")


def best_of(fn: Callable[[], Any], repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def report_hash(shards: Path) -> None:
    """What the reader's per-shard sha256 check (against the manifest) costs: hashing every
    shard's stored bytes against loading every shard without the check."""
    paths = sorted(shards.glob("*.tar.gz"))
    hashing = best_of(lambda: [sha256_bytes(p.read_bytes()) for p in paths])
    loading = best_of(lambda: [read_shard(p) for p in paths])
    print(f"  sha256 check / unchecked shard load = {hashing / loading:.4f}x  (the reader hashes "
          "each shard it loads)")


def report_disk(tmp: Path, tokens: int) -> None:
    shard_size, shard_alloc = disk_bytes(sorted((tmp / "shards").glob("*.tar.gz")))
    pkl_size, pkl_alloc = disk_bytes(sorted((tmp / "pkl").iterdir()))
    per_token = shard_size / tokens
    print(f"  disk per token: shards {per_token:.2f} B ({shard_alloc / tokens:.2f} allocated), "
          f"pickles {pkl_size / tokens:.2f} B ({pkl_alloc / tokens:.2f} allocated), "
          f"raw uint16 2.00 B")
    print(f"  pickle / shard bytes = {pkl_size / shard_size:.2f}x; shards "
          f"{'ok' if per_token <= GOAL_BYTES_PER_TOKEN else 'MISSED'} "
          f"(goal <= {GOAL_BYTES_PER_TOKEN} B/token)")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
