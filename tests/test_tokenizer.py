"""Text tokenizer loading, the image-code map parsed from IMGIMG names, and the fallback's ids.

    OMP_NUM_THREADS=1 .venv/bin/pytest tests/test_tokenizer.py -q
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from fixtures_tokenizer import image_name, write_tokenizer
from pipeline.errors import DataError
from pipeline.io import sha256_file
from shards import vocab
from shards.tokenizer import (FALLBACK_TEXT_BASE, fallback_decode, fallback_tokenizer,
                              image_code_of_name, load_text_tokenizer, special_mask)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    return write_tokenizer(tmp_path_factory.mktemp("tok") / "text_tokenizer.json", seed=1)


def test_image_map_is_parsed_from_shuffled_names(written):
    path, expected = written
    tok = load_text_tokenizer(path)
    assert tok.kind == "chameleon" and tok.digest == sha256_file(path)
    np.testing.assert_array_equal(tok.image_code_to_id, expected)
    assert (tok.image_code_to_id != vocab.IMAGE_CODE_FIRST + np.arange(8192)).mean() > 0.99
    assert tok.id_to_image_code.shape == (vocab.VOCAB_SIZE,)
    np.testing.assert_array_equal(tok.id_to_image_code[expected], np.arange(8192))
    assert (tok.id_to_image_code >= 0).sum() == 8192 and tok.id_to_image_code[vocab.SEP] == -1


def test_image_name_digits():
    assert image_code_of_name("IMGIMGBAZ") == 10
    assert image_code_of_name("IMGIMGAZ") == 0
    assert image_code_of_name(image_name(8191)) == 8191
    with pytest.raises(DataError):
        image_code_of_name("IMGIMGKZ")


def test_text_is_encoded_without_bos_and_outside_special_ids(written):
    tok = load_text_tokenizer(written[0])
    ids = tok.encode("What action should the robot take to lift the red cube?")
    assert ids and ids[0] != vocab.BOS and not special_mask(np.asarray(ids)).any()


def test_bad_files_are_refused(written, tmp_path):
    doc = json.loads(written[0].read_text())
    vocab_map = doc["model"]["vocab"]
    broken = dict(vocab_map)
    broken.pop(image_name(17))
    doc["model"]["vocab"] = broken
    (tmp_path / "missing.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match="1 of 8192 codebook indices"):
        load_text_tokenizer(tmp_path / "missing.json")
    moved = {k: (v + 1 if k == "<reserved08706>" else v) for k, v in vocab_map.items()}
    moved.pop(next(k for k, v in vocab_map.items() if v == vocab.SEP + 1), None)
    doc["model"]["vocab"] = moved
    (tmp_path / "moved.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match="<reserved08706> has id 8711"):
        load_text_tokenizer(tmp_path / "moved.json")
    with pytest.raises(DataError, match="does not exist"):
        load_text_tokenizer(tmp_path / "nope.json")


def test_fallback_keeps_special_ids_and_text_disjoint():
    tok = fallback_tokenizer(warn=False)
    assert tok.kind == "fallback"
    np.testing.assert_array_equal(tok.image_code_to_id, 4 + np.arange(8192))
    text_ids = np.arange(FALLBACK_TEXT_BASE, FALLBACK_TEXT_BASE + 256)
    assert text_ids.max() < vocab.VOCAB_SIZE and not special_mask(text_ids).any()
    named = [v for k, v in vars(vocab).items() if k.isupper() and isinstance(v, int)
             and k not in ("VOCAB_SIZE", "CODEBOOK_SIZE", "NUM_BINS", "PATCH_PX", "VQ_DOWNSAMPLE",
                           "IGNORE_INDEX")]
    for value in named + [vocab.grid_token(256), vocab.grid_token(512)]:
        assert special_mask(np.asarray([value]))[0], value
    bins = np.arange(1, 257)
    assert special_mask(vocab.ACTION_BIN_BASE + bins).all()
    assert special_mask(vocab.STATE_BIN_BASE + bins).all()
    text = "pick up the bowl, put it in the basket?"
    assert fallback_decode(tok.encode(text)) == text


def test_fallback_warns(capsys):
    fallback_tokenizer()
    assert "FALLBACK" in capsys.readouterr().err
