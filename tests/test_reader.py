"""Tests of the training reader `shards.reader`: batch format, determinism, mixing, rank split,
exact resume (also in a new process), split filtering and the Hugging Face `datasets` loader."""

from __future__ import annotations

import io
import itertools
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import DataError
from pipeline.io import read_json, write_json
from bench.shard_factory import make_shards
from shards.format import tar_members
from shards.reader import ShardReader, load_hf_dataset
from shards.shard_set import read_shard

VLA_SHARDS, WM_SHARDS = [9, 4, 7, 2], [6, 5, 1]


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    make_shards(out, vla_shards=VLA_SHARDS, wm_shards=WM_SHARDS)
    return out


def reader(root: Path, **kw) -> ShardReader:
    kw.setdefault("batch_size", 4)
    kw.setdefault("split", "all")
    kw.setdefault("shuffle_shards", 2)
    return ShardReader(root, **kw)


def take(r: ShardReader, n: int) -> list[dict]:
    return list(itertools.islice(r.forever(), n))


def all_samples(root: Path) -> dict:
    return {s.key: s for p in sorted(root.glob("*.tar.gz")) for s in read_shard(p)}


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["keys"] == y["keys"]
        for name in ("input_ids", "labels", "attention_mask", "is_vla", "actions"):
            assert torch.equal(x[name], y[name]), name


def test_batch_format(shard_dir):
    truth = all_samples(shard_dir)
    for batch in take(reader(shard_dir, batch_size=5), 6):
        ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
        assert ids.dtype == labels.dtype == mask.dtype == torch.int64
        assert batch["is_vla"].dtype == torch.bool and batch["actions"].dtype == torch.float32
        assert ids.shape[0] == 5 and ids.shape[1] % 8 == 0 and batch["actions"].shape == (5, 5, 7)
        for row, key in enumerate(batch["keys"]):
            s = truth[key]
            n = len(s.tokens)
            assert ids[row, :n].tolist() == s.tokens.tolist() and not ids[row, n:].any()
            assert mask[row].tolist() == [1] * n + [0] * (ids.shape[1] - n)
            expected = torch.full((ids.shape[1],), -100)
            for a, b in s.targets:
                expected[a:b] = ids[row, a:b]
            assert torch.equal(labels[row], expected)
            assert bool(batch["is_vla"][row]) == key.startswith("vla")
            chunk = torch.zeros(5, 7) if s.chunk is None else torch.from_numpy(s.chunk.copy())
            assert torch.equal(batch["actions"][row], chunk)
        assert ids.shape[1] - 8 < int(mask.sum(1).max())        # padded to the batch max only


def test_deterministic_for_a_seed(shard_dir):
    first = take(reader(shard_dir, seed=3), 12)
    assert_same(first, take(reader(shard_dir, seed=3, prefetch=0), 12))
    other = take(reader(shard_dir, seed=4), 12)
    assert [b["keys"] for b in first] != [b["keys"] for b in other]


def test_unshuffled_order_follows_the_manifest(shard_dir):
    keys = [k for b in take(reader(shard_dir, kinds=("vla",), shuffle=False), 3) for k in b["keys"]]
    assert keys == [f"vla000__{i:06d}" for i in range(9)] + [f"vla001__{i:06d}" for i in range(3)]


def test_mix_natural_and_given(shard_dir):
    natural = reader(shard_dir, batch_size=8)
    assert natural.mix == pytest.approx(sum(VLA_SHARDS) / (sum(VLA_SHARDS) + sum(WM_SHARDS)))
    for mix in (natural.mix, 0.25):
        batches = take(reader(shard_dir, batch_size=8, mix=mix), 100)
        fraction = float(torch.cat([b["is_vla"] for b in batches]).float().mean())
        assert abs(fraction - mix) < 0.05
    assert all(b["is_vla"].all() for b in take(reader(shard_dir, mix=1.0), 5))


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_get_equal_batches(shard_dir, world_size):
    for batch_size in (1, 3):
        counts = set()
        for rank in range(world_size):
            r = reader(shard_dir, batch_size=batch_size, rank=rank, world_size=world_size)
            counts |= {len(list(r)), len(list(r)), len(r)}            # two epochs and len()
        assert len(counts) == 1 and counts.pop() > 0


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("kind", ["vla", "wm"])
def test_ranks_samples_are_disjoint_within_a_stream_epoch(shard_dir, world_size, kind):
    seen = []
    for rank in range(world_size):
        r = reader(shard_dir, batch_size=1, rank=rank, world_size=world_size, kinds=(kind,))
        seen.append([k for b in r for k in b["keys"]])
    union = set().union(*seen)
    assert sum(map(len, seen)) == len(union)                       # no repeats, disjoint
    total = sum(VLA_SHARDS if kind == "vla" else WM_SHARDS)
    assert len(union) == total - total % world_size                # everything else once


def test_resume_in_process_at_many_points(shard_dir):
    base = take(reader(shard_dir, seed=1), 30)
    for n in (0, 1, 5, len(reader(shard_dir)), 17):
        first = reader(shard_dir, seed=1)
        take(first, n)
        again = reader(shard_dir, seed=1)
        again.load_state_dict(json.loads(json.dumps(first.state_dict())))
        assert_same(take(again, 30 - n), base[n:])


def test_epoch_iteration_matches_forever(shard_dir):
    r = reader(shard_dir, seed=2)
    epochs = list(r) + list(r)
    assert len(epochs) == 2 * len(r)
    assert_same(epochs, take(reader(shard_dir, seed=2), 2 * len(r)))


RESUME_SCRIPT = """
import itertools, json, sys, torch
from shards.reader import ShardReader
root, state_file, out_file, n = sys.argv[1:5]
r = ShardReader(root, batch_size=4, split="all", shuffle_shards=2, seed=7, rank=1, world_size=2)
r.load_state_dict(json.load(open(state_file)))
torch.save(list(itertools.islice(r.forever(), int(n))), out_file)
"""


def test_resume_in_a_new_process(shard_dir, tmp_path):
    kw = dict(seed=7, rank=1, world_size=2)
    base = take(reader(shard_dir, **kw), 14)
    first = reader(shard_dir, **kw)
    take(first, 6)
    write_json(tmp_path / "state.json", first.state_dict())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", RESUME_SCRIPT, str(shard_dir), str(tmp_path / "state.json"),
                    str(tmp_path / "next.pt"), "8"], check=True, env=env, timeout=60)
    assert_same(torch.load(tmp_path / "next.pt", weights_only=False), base[6:])


def test_state_from_other_settings_is_refused(shard_dir):
    state = reader(shard_dir, seed=1).state_dict()
    with pytest.raises(ValueError, match="saved with"):
        reader(shard_dir, seed=2).load_state_dict(state)


@pytest.mark.parametrize("split", ["train", "val"])
def test_split_filtering(shard_dir, split):
    truth = all_samples(shard_dir)
    for kind in ("vla", "wm"):
        wanted = {k for k, s in truth.items() if s.split == split and k.startswith(kind)}
        r = reader(shard_dir, split=split, batch_size=1, kinds=(kind,))
        assert {k for b in r for k in b["keys"]} == wanted


def test_split_counts_from_manifest_match_scan(shard_dir, tmp_path):
    manifest = read_json(shard_dir / "manifest.json")
    for entry in manifest["shards"]:
        samples = read_shard(shard_dir / entry["path"])
        entry["splits"] = {s: sum(x.split == s for x in samples) for s in ("train", "val")}
        (tmp_path / entry["path"]).symlink_to(shard_dir / entry["path"])
    write_json(tmp_path / "manifest.json", manifest)
    assert_same(take(reader(tmp_path, split="train"), 5), take(reader(shard_dir, split="train"), 5))


def test_manifest_count_mismatch_is_an_error(shard_dir, tmp_path):
    manifest = read_json(shard_dir / "manifest.json")
    for entry in manifest["shards"]:
        entry["samples"] += 1
        (tmp_path / entry["path"]).symlink_to(shard_dir / entry["path"])
    write_json(tmp_path / "manifest.json", manifest)
    with pytest.raises(DataError, match="manifest says"):
        take(reader(tmp_path), 3)


def test_bad_settings_are_refused(shard_dir):
    with pytest.raises(ValueError, match="rank"):
        reader(shard_dir, rank=2, world_size=2)
    with pytest.raises(ValueError, match="mix"):
        reader(shard_dir, mix=0.5, kinds=("wm",))
    with pytest.raises(DataError, match="fewer than world_size"):
        reader(shard_dir, world_size=50)


def test_tar_members_reads_long_pax_names():
    raw = io.BytesIO()
    name = "x" * 120 + "__000001.tokens.npy"
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    assert [(n, bytes(p)) for n, p in tar_members(raw.getvalue())] == [(name, b"abc")]


def test_load_hf_dataset(shard_dir, tmp_path):
    ds = load_hf_dataset(shard_dir, "vla", cache_dir=tmp_path / "hf")
    assert len(ds) == sum(VLA_SHARDS)
    truth = all_samples(shard_dir)
    row = ds[0]
    assert row["tokens.npy"] == truth[row["__key__"]].tokens.tolist()
    assert row["json"]["kind"] == "vla"
    assert np.allclose(row["chunk.npy"], truth[row["__key__"]].chunk)


def test_world_model_only_batches(shard_dir):
    batch = take(reader(shard_dir, kinds=("wm",)), 1)[0]
    assert not batch["is_vla"].any() and batch["actions"].shape == (4, 0, 0)
    assert all(k.startswith("wm") for k in batch["keys"])
