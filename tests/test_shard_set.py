"""Tests of the one shard codec (`shards.format`) and the one shard-set object
(`shards.shard_set.ShardSet`): a sample written and read back, the strict reading verify uses, and
a shard set's manifest, entries, splits, sha256-checked reads and one-line errors."""

from __future__ import annotations

import gzip
import io
import json
import tarfile

import numpy as np
import pytest

from bench.shard_factory import make_shards
from pipeline.errors import DataError
from pipeline.io import sha256_bytes
from shards import vocab
from shards.conversation import VLA, ConvSample
from shards.format import (CHUNK, END_OF_ARCHIVE, META, TOKENS, decode_sample, iter_samples,
                           sample_members, sample_tar_bytes, tar_bytes)
from shards.shard_set import ShardSet


def vla_sample(step: int) -> ConvSample:
    tokens = np.array([vocab.BOS, 5, 6, vocab.SEP, 7, vocab.SEP], np.int64)
    return ConvSample(VLA, "ep_a", step, tokens, [[4, 6]], np.full((2, 3), 0.5, np.float32))


def test_a_written_sample_reads_back_through_the_codec():
    tar = b"".join(sample_tar_bytes(f"ep_a__{i:06d}", sample_members(vla_sample(i), "val", "go"))
                   for i in range(2)) + END_OF_ARCHIVE
    read = [decode_sample(key, members) for key, members in iter_samples(tar)]
    assert [s.key for s in read] == ["ep_a__000000", "ep_a__000001"]
    assert read[1].tokens.dtype == np.uint16 and read[1].tokens.tolist() == [
        vocab.BOS, 5, 6, vocab.SEP, 7, vocab.SEP]
    assert read[1].targets == [[4, 6]] and read[1].split == "val"
    assert read[1].chunk.shape == (2, 3) and (read[1].chunk == 0.5).all()
    assert tar_bytes("x.tar.gz", gzip.compress(tar)) == tar and tar_bytes("x.tar", tar) == tar


def _tar(add) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        add(tar)
    return raw.getvalue()


def _file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_strict_reading_refuses_what_the_reader_passes_over():
    def with_dir(tar):
        info = tarfile.TarInfo("somedir")
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
        _file(tar, "k__000000.json", b"{}")
    data = _tar(with_dir)
    assert [k for k, _ in iter_samples(data)] == ["k__000000"]
    with pytest.raises(DataError, match="non-file tar member 'somedir/'"):
        list(iter_samples(data, strict=True))
    twice = _tar(lambda tar: [_file(tar, "k__000000.json", b"{}") for _ in range(2)])
    with pytest.raises(DataError, match="appears twice"):
        list(iter_samples(twice))
    damaged = bytearray(_tar(lambda tar: _file(tar, "k__000000.json", b"{}")))
    damaged[0] ^= 0x01                                 # the name: the header checksum breaks
    assert len(list(iter_samples(bytes(damaged)))) == 1
    with pytest.raises(DataError, match="checksum"):
        list(iter_samples(bytes(damaged), strict=True))


def test_decode_sample_names_key_and_file():
    members = {TOKENS: sample_members(vla_sample(0), "train", "go")[TOKENS], META: json.dumps(
        {"kind": "vla", "targets": [], "split": "train"}).encode()}
    with pytest.raises(DataError, match=r"VLA sample needs a 2-D chunk.npy \[file=s.tar, key=k\]"):
        decode_sample("k", members, file="s.tar")
    with pytest.raises(DataError, match=f"lacks {TOKENS} or {META}"):
        decode_sample("k", {CHUNK: b""})


@pytest.fixture()
def shard_set_dir(tmp_path):
    make_shards(tmp_path, vla_shards=[3, 2], wm_shards=[4])
    return tmp_path


def test_shard_set_reads_entries_and_checks_sha256(shard_set_dir):
    shards = ShardSet.open(shard_set_dir)
    assert ShardSet.open(shards) is shards
    assert shards.sha256 == sha256_bytes((shard_set_dir / "manifest.json").read_bytes())
    assert [e["path"] for e in shards.entries("vla")] == ["vla-000000.tar.gz", "vla-000001.tar.gz"]
    assert len(shards.entries()) == 3
    entry = shards.entries("wm")[0]
    samples = shards.read(entry)
    assert len(samples) == 4 and all(s.tokens.dtype == np.uint16 for s in samples)
    assert {s.split for s in shards.read(entry, "val")} <= {"val"}
    path = shards.path(entry)
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(DataError, match=r"differs from its sha256 in manifest.json.*wm-000000"):
        shards.read(entry)


def test_shard_set_errors_are_one_line_naming_the_file(shard_set_dir, tmp_path):
    with pytest.raises(DataError, match=r"no manifest.json: not a shard directory.*file=.*"
                                        r"nothing[/\\]manifest.json\]$"):
        ShardSet.open(tmp_path / "nothing")
    (shard_set_dir / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match=r"not a shard manifest .*manifest.json\]$") as err:
        ShardSet.open(shard_set_dir)
    assert "\n" not in str(err.value)


def test_current_sha256_sees_a_rewritten_manifest(shard_set_dir):
    shards = ShardSet.open(shard_set_dir)
    assert shards.current_sha256() == shards.sha256
    manifest = json.loads((shard_set_dir / "manifest.json").read_text())
    manifest["shards"] = manifest["shards"][:1]
    (shard_set_dir / "manifest.json").write_text(json.dumps(manifest))
    assert shards.current_sha256() != shards.sha256


def test_a_missing_record_names_the_manifest(shard_set_dir):
    shards = ShardSet.open(shard_set_dir)
    assert shards.record("schema") == 1
    with pytest.raises(DataError, match=r"manifest has no 'conv' record \[file=.*manifest.json\]"):
        shards.record("conv")


def test_stats_are_read_only_when_they_match_the_manifest(shard_set_dir):
    manifest = json.loads((shard_set_dir / "manifest.json").read_text())
    data = b'{"schema": 1}'
    (shard_set_dir / "stats.json").write_bytes(data)
    manifest["stats"] = {"path": "stats.json", "sha256": sha256_bytes(data)}
    (shard_set_dir / "manifest.json").write_text(json.dumps(manifest))
    assert ShardSet.open(shard_set_dir).stats_record() == {"schema": 1}
    (shard_set_dir / "stats.json").write_bytes(b'{"schema": 2}')
    with pytest.raises(DataError, match=r"stats differ from their sha256 in manifest.json.*stats"):
        ShardSet.open(shard_set_dir).stats_record()
