"""The VQ-GAN and tokenizer records of manifests and cards: JSON round trips, the earlier
string-only form still read, and the one loader of each (digest-checked)."""

from __future__ import annotations

import pytest
from fixtures_tokenizer import write_tokenizer

from pipeline.errors import DataError
from pipeline.io import sha256_file
from shards.records import TokenizerRecord, VQRecord
from shards.tokenizer import TokenizerMismatch, fallback_tokenizer, load_tokenizer_from_record
from shards.vq import VQMismatch, load_vq, load_vq_from_record

ARCH = {"ch": 32}
# the "vq" field of a manifest / card written before the structured record (main at 8ec7e6c)
LEGACY = {"arch": ARCH, "digest": "d" * 64, "source": "random-small-seed0", "untrained": True}


def test_random_record_json_keeps_the_earlier_fields():
    rec = VQRecord(kind="random", digest="d" * 64, arch=ARCH, name="small", seed=0)
    doc = rec.to_json()
    assert doc == {**LEGACY, "kind": "random", "name": "small", "seed": 0}
    assert VQRecord.from_json(doc) == rec and VQRecord.from_json(doc).arch == ARCH


def test_weights_record_round_trip():
    rec = VQRecord(kind="weights", digest="e" * 64, arch=ARCH, format="hf")
    assert rec.to_json() == {"kind": "weights", "digest": "e" * 64, "arch": ARCH,
                             "untrained": False, "source": "hf", "format": "hf"}
    assert VQRecord.from_json(rec.to_json()) == rec


@pytest.mark.parametrize("source,expected", [
    ("random-small-seed0", {"kind": "random", "name": "small", "seed": 0}),
    ("random-my-arch-seed12", {"kind": "random", "name": "my-arch", "seed": 12}),
    ("original", {"kind": "weights", "format": "original"}),
    ("hf", {"kind": "weights", "format": "hf"}),
])
def test_string_only_records_are_still_read(source, expected):
    rec = VQRecord.from_json({**LEGACY, "source": source})
    assert {k: getattr(rec, k) for k in expected} == expected and rec.digest == "d" * 64
    assert rec.source == source


@pytest.mark.parametrize("source", ["random-small", "random--seed1", "random-small-seedX", "", None])
def test_unknown_string_records_are_refused(source):
    with pytest.raises(DataError, match="VQ record: source"):
        VQRecord.from_json({**LEGACY, "source": source})


def test_inconsistent_records_are_refused():
    with pytest.raises(DataError, match="needs its preset name and integer seed"):
        VQRecord(kind="random", digest="d", name="small")
    with pytest.raises(DataError, match="weights format"):
        VQRecord(kind="weights", digest="d", format="zip")
    with pytest.raises(DataError, match="kind 'other'"):
        VQRecord.from_json({"kind": "other", "digest": "d"})
    with pytest.raises(DataError, match="missing field 'digest'"):
        TokenizerRecord.from_json({"kind": "fallback"})


def test_vq_loader_rebuilds_a_random_vq_and_checks_its_digest():
    handle = load_vq(None, random_arch="small", seed=0, device="cpu")
    assert handle.record.to_json()["source"] == "random-small-seed0"
    again = load_vq_from_record(VQRecord.from_json(handle.record.to_json()), device="cpu")
    assert again.digest == handle.digest and again.untrained
    with pytest.raises(VQMismatch, match="has digest .* made with " + "0" * 64):
        load_vq_from_record(VQRecord(kind="random", digest="0" * 64, name="small", seed=0),
                            device="cpu")
    unchecked = load_vq_from_record(VQRecord(kind="random", digest="0" * 64, name="small",
                                             seed=0), device="cpu", check=False)
    assert unchecked.digest == handle.digest
    with pytest.raises(VQMismatch, match="pass their path"):
        load_vq_from_record(VQRecord(kind="weights", digest="0", format="original"))


def test_tokenizer_loader(tmp_path):
    fallback = fallback_tokenizer(warn=False)
    rec = TokenizerRecord.from_json(fallback.record.to_json())
    assert rec.to_json() == {"kind": "fallback", "digest": "fallback-bytes-v1", "path": None}
    assert load_tokenizer_from_record(rec).kind == "fallback"
    path, _ = write_tokenizer(tmp_path / "text_tokenizer.json", seed=0)
    chameleon = load_tokenizer_from_record(
        TokenizerRecord(kind="chameleon", digest=sha256_file(path), path=str(path)))
    assert chameleon.record == TokenizerRecord(kind="chameleon", digest=sha256_file(path),
                                               path=str(path))
    gone = TokenizerRecord(kind="chameleon", digest=sha256_file(path), path=str(tmp_path / "gone"))
    with pytest.raises(TokenizerMismatch, match="is not available; pass tokenizer_path"):
        load_tokenizer_from_record(gone)
    assert load_tokenizer_from_record(gone, path).digest == sha256_file(path)
    with pytest.raises(TokenizerMismatch, match="made with fallback-bytes-v1"):
        load_tokenizer_from_record(rec, path)
