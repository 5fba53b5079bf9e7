"""VQ-GAN loading (both checkpoint formats), encoding, errors and the decoder, on a tiny random arch.

    OMP_NUM_THREADS=1 .venv/bin/pytest tests/test_vq.py -q
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from shards import vq, vq_arch
from shards.vq_decoder import DecoderError, decode
from vq_fixtures import save_hf_format, save_original_format

# Narrow but structurally complete: 5 levels (16x downsampling), the real codebook size.
TINY = {**vq_arch.SMALL_ARCH, "ch_mult": [1, 1, 1, 1, 2], "z_channels": 64, "embed_dim": 64}


@pytest.fixture(scope="module")
def handle():
    return vq.random_vq(TINY, seed=3, name="tiny")


@pytest.fixture(scope="module")
def batch():
    frames = np.random.default_rng(0).integers(0, 256, (2, 256, 256, 3), dtype=np.uint8)
    return vq.preprocess(frames, 256)


@pytest.fixture(scope="module")
def original_dir(handle, tmp_path_factory):
    return save_original_format(handle, tmp_path_factory.mktemp("orig"))


def test_original_format_round_trip(handle, batch, original_dir):
    for path in (original_dir, original_dir / vq.ORIGINAL_CKPT):
        loaded = vq.load_vq(str(path), device="cpu")
        assert loaded.digest == handle.digest and not loaded.untrained
        assert loaded.arch == handle.arch
        assert sorted(loaded.decoder_state) == sorted(handle.decoder_state)
        assert torch.equal(vq.encode(loaded, batch), vq.encode(handle, batch))


def test_original_yaml_fields(original_dir):
    params = yaml.safe_load((original_dir / vq.ORIGINAL_YAML).read_text())["model"]["params"]
    assert params["n_embed"] == 8192 and params["embed_dim"] == 64
    assert set(params["ddconfig"]) == set(vq_arch.DDCONFIG_KEYS)
    state = torch.load(original_dir / vq.ORIGINAL_CKPT, weights_only=True)["state_dict"]
    non_decoder = [k for k in state if not k.startswith("decoder.")]
    assert len(non_decoder) == len(handle_keys(TINY))
    for key in ("decoder.conv_in.weight", "decoder.mid.block_1.norm1.weight",
                "decoder.mid.attn_1.q.weight", "decoder.up.0.block.0.conv1.weight",
                "decoder.up.1.upsample.conv.weight", "decoder.norm_out.weight",
                "decoder.conv_out.weight", "quantize.embedding.weight", "post_quant_conv.weight"):
        assert key in state
    assert "decoder.up.0.upsample.conv.weight" not in state


def handle_keys(arch):
    return vq.build_model(arch).state_dict()


def test_full_arch_has_129_vq_keys():
    with torch.device("meta"):
        assert len(vq.build_model(vq_arch.FULL_ARCH).state_dict()) == 129


def test_hf_format_round_trip(handle, batch, tmp_path):
    save_hf_format(handle, tmp_path)
    loaded = vq.load_vq(str(tmp_path), device="cpu")
    assert loaded.source == "hf" and loaded.digest == handle.digest
    assert loaded.decoder_state is None
    assert torch.equal(vq.encode(loaded, batch), vq.encode(handle, batch))
    with pytest.raises(DecoderError, match="no decoder weights"):
        decode(loaded, np.zeros((1, 16, 16), np.int64))


def test_grids_and_code_range(handle, batch):
    codes = vq.encode(handle, batch)
    assert codes.shape == (2, 16, 16) and codes.dtype == torch.int64
    assert 0 <= int(codes.min()) and int(codes.max()) < 8192
    assert codes.unique().numel() > 16  # random weights still spread over the codebook
    big = vq.preprocess(np.zeros((1, 100, 100, 3), np.uint8), 512)
    assert vq.encode(handle, big).shape == (1, 32, 32)


def test_preprocess_scale_and_resize():
    frames = np.zeros((2, 64, 64, 3), np.uint8)
    frames[1] = 255
    x = vq.preprocess(frames, 64)
    assert x.shape == (2, 3, 64, 64) and x.dtype == torch.float32
    assert float(x[0].max()) == -1.0 and float(x[1].min()) == 1.0
    assert vq.preprocess(frames, 32).shape == (2, 3, 32, 32)
    with pytest.raises(vq.DataError, match="uint8"):
        vq.preprocess(frames.astype(np.float32), 64)


def test_random_init_seeded_and_untrained(handle):
    again = vq.random_vq(TINY, seed=3, name="tiny")
    other = vq.random_vq(TINY, seed=4, name="tiny")
    assert again.untrained and again.digest == handle.digest and other.digest != handle.digest


def test_bf16_mixed_agreement_measured(handle, batch):
    share = vq.agreement(handle, batch)
    assert 0.5 < share <= 1.0


# ---------------------------------------------------------------------------------------------
# Corrupt or mismatched checkpoints.
# ---------------------------------------------------------------------------------------------

def _rewrite(src, dst, edit_state=None, edit_yaml=None):
    dst.mkdir()
    doc = yaml.safe_load((src / vq.ORIGINAL_YAML).read_text())
    if edit_yaml:
        edit_yaml(doc["model"]["params"])
    (dst / vq.ORIGINAL_YAML).write_text(yaml.safe_dump(doc))
    blob = torch.load(src / vq.ORIGINAL_CKPT, weights_only=True)
    if edit_state:
        edit_state(blob["state_dict"])
    torch.save(blob, dst / vq.ORIGINAL_CKPT)
    return dst


def _drop(key):
    return lambda s: s.pop(key)


def _add(key):
    return lambda s: s.__setitem__(key, torch.zeros(1))


def _reshape(key):
    return lambda s: s.__setitem__(key, torch.zeros(3, 3))


BROKEN = {
    "missing": (_drop("encoder.conv_in.bias"), None, "missing encoder.conv_in.bias"),
    "unexpected": (_add("encoder.extra.weight"), None, "unexpected encoder.extra.weight"),
    "foreign": (_add("ema.decay"), None, "unexpected keys .*ema.decay"),
    "shape": (_reshape("quant_conv.weight"), None, "shapes do not match.*quant_conv.weight"),
    "codebook": (None, lambda p: p.__setitem__("n_embed", 4096), "codebook size mismatch"),
    "decoder": (_drop("decoder.conv_out.bias"), None, "decoder keys.*missing decoder.conv_out.bias"),
    "yaml": (None, lambda p: p["ddconfig"].pop("ch_mult"), "missing field 'ch_mult'"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_original_checkpoint(case, original_dir, tmp_path):
    edit_state, edit_yaml, message = BROKEN[case]
    path = _rewrite(original_dir, tmp_path / case, edit_state, edit_yaml)
    with pytest.raises(vq_arch.CheckpointError, match=message):
        vq.load_vq(str(path), device="cpu")


def test_loss_keys_are_ignored(original_dir, tmp_path, handle):
    path = _rewrite(original_dir, tmp_path / "loss", _add("loss.discriminator.main.0.weight"))
    assert vq.load_vq(str(path), device="cpu").digest == handle.digest


def test_non_torch_and_missing_files(original_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / vq.ORIGINAL_YAML).write_text((original_dir / vq.ORIGINAL_YAML).read_text())
    (bad / vq.ORIGINAL_CKPT).write_text("this is not a checkpoint")
    with pytest.raises(vq_arch.CheckpointError, match="not a torch checkpoint"):
        vq.load_vq(str(bad), device="cpu")
    torch.save({"weights": {}}, bad / vq.ORIGINAL_CKPT)
    with pytest.raises(vq_arch.CheckpointError, match="no 'state_dict'"):
        vq.load_vq(str(bad), device="cpu")
    with pytest.raises(vq_arch.CheckpointError, match="does not exist"):
        vq.load_vq(str(tmp_path / "nowhere"), device="cpu")


def test_hf_checkpoint_without_vq(handle, tmp_path):
    save_hf_format(handle, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(vq_arch.CheckpointError, match="does not include the VQ model"):
        vq.load_vq(str(tmp_path), device="cpu")


# ---------------------------------------------------------------------------------------------
# Decoder.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("side", [16, 32])
def test_decoder_shapes_range_determinism(side, original_dir):
    loaded = vq.load_vq(str(original_dir), device="cpu")
    codes = np.random.default_rng(side).integers(0, 8192, (1, side, side))
    first = decode(loaded, codes)
    assert first.shape == (1, side * 16, side * 16, 3) and first.dtype == np.uint8
    assert first.max() > first.min()
    assert np.array_equal(first, decode(vq.load_vq(str(original_dir), device="cpu"), codes))


def test_decoder_rejects_bad_codes(handle):
    with pytest.raises(DecoderError, match="must be in"):
        decode(handle, np.full((1, 16, 16), 9000))
