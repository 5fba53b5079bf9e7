"""Pure conversation building: image blocks, VLA/world-model layouts, relative and static chunks,
the too-long policy. No files.

    OMP_NUM_THREADS=1 .venv/bin/pytest tests/test_conversation.py -q
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from pipeline.config import ConvConfig
from pipeline.errors import DataError
from shards import vocab
from shards.bins import to_bins
from shards.conversation import (Codec, action_blocks, blocks_by_kind, episode_samples, episode_tokens,
                                 image_block, image_blocks, parse_action_blocks, parse_image_block,
                                 split_blocks, vla_sample, wm_sample)
from shards.tokenizer import fallback_tokenizer

TOK = fallback_tokenizer(warn=False)
D, S = 6, 6
CODEC = Codec(state_min=np.full(S, -1.0), state_max=np.full(S, 1.0), action_min=np.full(D, -1.0),
              action_max=np.full(D, 1.0))


def episode(steps: int = 8, side: int = 2, seed: int = 0, actions=None, states=None):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 8192, (steps, 2, side, side))
    actions = rng.uniform(-1, 1, (steps, D)) if actions is None else actions
    states = rng.uniform(-1, 1, (steps, S)) if states is None else states
    return episode_tokens("ep", "stack the cups", codes, actions, states, TOK, CODEC)


@pytest.mark.parametrize("side_px,length", [(256, 276), (512, 1060)])
def test_image_block_lengths_and_layout(side_px, length):
    n = side_px // 16
    codes = np.arange(n * n).reshape(n, n) % 8192
    block = image_block(codes, TOK.image_code_to_id, side_px)
    assert len(block) == length == vocab.image_block_len(side_px)
    grid = 8804 + side_px // 32
    assert block[:3].tolist() == [8197, grid, grid] and block[-1] == 8196
    rows = block[3:-1].reshape(n, n + 1)
    assert (rows[:, -1] == 8803).all()
    np.testing.assert_array_equal(rows[:, :-1], 4 + codes)


def test_image_block_uses_the_map_not_an_offset():
    code_to_id = 4 + np.roll(np.arange(8192), 5)
    block = image_block(np.array([[0, 1], [2, 3]]), code_to_id)
    assert block[3:5].tolist() == [code_to_id[0], code_to_id[1]]


def test_vla_history_frames_and_targets():
    ep = episode()
    block = vocab.image_block_len(32)
    for j, frames in ((0, 1), (1, 2), (5, 2)):
        s = vla_sample(ep, CODEC, j, history=2, chunk=3)
        human = len(ep.vla_prompt) + (S + 2) + 2 * frames * block
        assert s.targets == [[1 + human + 1, len(s.tokens)]]
        assert len(s.tokens) == 1 + human + 1 + 3 * (D + 2) + 1
        assert s.tokens[-1] == vocab.SEP and s.tokens[1 + human] == vocab.SEP
        assert s.chunk.shape == (3, D) and s.chunk.dtype == np.float32
    with pytest.raises(ValueError):
        vla_sample(ep, CODEC, 6, history=2, chunk=3)


def test_sample_counts_no_padding():
    drops: Counter = Counter()
    samples = list(episode_samples(episode(steps=8), CODEC, ConvConfig(chunk=3), drops))
    assert [s.step for s in samples if s.kind == "vla"] == list(range(6))   # T - K + 1
    assert [s.step for s in samples if s.kind == "wm"] == list(range(7))    # T - 1
    assert not drops


def test_wm_layout():
    ep = episode()
    s = wm_sample(ep, CODEC, 2)
    block = vocab.image_block_len(32)
    head = 1 + len(ep.wm_prompt) + 2 * block + (D + 2) + 1
    assert s.targets == [[head, head + 2 * block + 1]] and len(s.tokens) == head + 2 * block + 1
    np.testing.assert_array_equal(s.tokens[head:head + block], ep.images[3, 0])


def test_relative_chunk_and_static_drop():
    steps = 6
    states = np.zeros((steps, S))
    states[:, 0] = 0.5
    actions = np.zeros((steps, D))
    actions[:, 0] = 0.5                     # equals the state: static once made relative
    actions[4:, 0] = 0.9
    ep = episode(steps=steps, actions=actions, states=states)
    codec = replace(CODEC, relative_dims=(0,))
    s = vla_sample(ep, codec, 0, history=1, chunk=2)
    np.testing.assert_allclose(s.chunk[:, 0], 0.0, atol=1e-6)   # 0.5 - 0.5, normalized
    conv = ConvConfig(history=1, chunk=2, drop_static_chunks=True, world_model=False,
                      relative_action_dims=(0,))
    drops: Counter = Counter()
    kept = [s.step for s in episode_samples(ep, codec, conv, drops)]
    assert kept == [3, 4] and drops == {("vla", "static_chunk"): 3}


def test_too_long_policy():
    ep = episode(side=16)                   # 256 px: 276 tokens per image
    conv = ConvConfig(chunk=2, max_seq_len=700)
    with pytest.raises(DataError, match=r"vla sample at step 1 has 1\d{3} tokens > "
                                        r"conv.max_seq_len=700"):
        list(episode_samples(ep, CODEC, conv, Counter()))
    drops: Counter = Counter()
    kept = list(episode_samples(ep, CODEC, replace(conv, too_long="drop"), drops))
    assert [s.step for s in kept] == [0]    # only VLA j=0 (one frame pair) fits
    assert drops == {("vla", "too_long"): 6, ("wm", "too_long"): 7}


def test_lengths_at_256_and_512():
    for side, block in ((16, 276), (32, 1060)):
        ep = episode(steps=4, side=side)
        wm = wm_sample(ep, CODEC, 0)
        assert len(wm.tokens) == 1 + len(ep.wm_prompt) + 4 * block + (D + 2) + 2


# ---------------------------------------------------------------------------------------------
# Parsers: build -> parse gives the input back; malformed blocks give one-line problems.
# ---------------------------------------------------------------------------------------------

def test_action_and_state_blocks_parse_back():
    block = vocab.action_block(np.array([1, 256, 7]))
    assert block.tolist() == [10004, 10006, 10261, 10012, 15004]
    assert vocab.parse_action_block(block).tolist() == [1, 256, 7]
    state = vocab.state_block(np.array([3, 1]))
    assert state.tolist() == [15504, 15508, 15506, 16004]
    assert vocab.parse_state_block(state).tolist() == [3, 1]
    with pytest.raises(DataError, match="state block has ids outside its 256 bins"):
        vocab.parse_state_block([15504, 15505, 16004])           # bin 0
    with pytest.raises(DataError, match="not opened by 10004 and closed by 15004"):
        vocab.parse_action_block([10004, 10006, 8710])
    assert vocab.action_bins_of([0, 10004, 10006, 10261, 15004, -100, 8710]).tolist() == [1, 256]


@pytest.mark.parametrize("grid", [(2, 2), (2, 4)])     # square, and non-square (published fit)
def test_image_block_parses_back(grid):
    code_to_id = 4 + np.roll(np.arange(8192), 5)
    id_to_code = np.full(vocab.VOCAB_SIZE, -1)
    id_to_code[code_to_id] = np.arange(8192)
    codes = np.arange(grid[0] * grid[1]).reshape(grid) * 1000
    block = image_blocks(codes[None], code_to_id)[0]
    assert block[1:3].tolist() == [8804 + grid[0] // 2, 8804 + grid[1] // 2]
    np.testing.assert_array_equal(parse_image_block(block, id_to_code), codes)
    np.testing.assert_array_equal(parse_image_block(block), code_to_id[codes])   # ids, no map
    broken = block.copy()
    broken[3 + grid[1]] = vocab.SEP                   # the first row's row-end token
    with pytest.raises(DataError, match="image row not closed by the row-end token"):
        parse_image_block(broken)
    broken = block.copy()
    broken[3] = vocab.SEP                             # a code position
    with pytest.raises(DataError, match=r"non-image-code ids \[8710\]"):
        parse_image_block(broken, id_to_code)
    with pytest.raises(DataError, match="not an image block"):
        parse_image_block(block[:-1])


def test_split_blocks_cuts_a_vla_sample_into_typed_segments():
    ep = episode()
    s = vla_sample(ep, CODEC, 1, history=2, chunk=3)
    segs, problems = split_blocks(s.tokens, action_dim=D, state_dim=S)
    p, img = len(ep.vla_prompt), 3 + 2 * 3 + 1             # 2x2 codes: 10 tokens a block
    first_image = 1 + p + S + 2
    assert problems == []
    assert [tuple(x) for x in segs[:3]] == [("text", 1, 1 + p), ("state", 1 + p, first_image),
                                            ("image", first_image, first_image + img)]
    assert [x.kind for x in segs] == ["text", "state", *["image"] * 4, "sep", *["action"] * 3,
                                      "sep"]
    assert segs[-1].end == len(s.tokens) and segs[6].end == s.targets[0][0]
    actions = [vocab.parse_action_block(s.tokens[a:b]) for k, a, b in segs if k == "action"]
    np.testing.assert_array_equal(np.stack(actions), to_bins(s.chunk.astype(np.float64),
                                                              CODEC.num_bins))
    images = blocks_by_kind(s.tokens, action_dim=D, state_dim=S)["image"]
    np.testing.assert_array_equal(parse_image_block(images[-1]), ep.images[1, 1][3:-1]
                                  .reshape(2, 3)[:, :2])


def test_split_blocks_problems():
    bos, sep = vocab.BOS, vocab.SEP
    short_action = [bos, vocab.ACTION_START, 10006, vocab.ACTION_END, sep]
    assert split_blocks(np.array(short_action), action_dim=2, state_dim=S)[1] == [
        "action block at 1 is not 4 tokens closed by 15004"]
    bad_grid = [bos, vocab.IMAGE_START, 0, 0]
    assert split_blocks(np.array(bad_grid), action_dim=2, state_dim=S)[1] == [
        "image block at 1 is not 0 tokens closed by 8196"]
    with pytest.raises(DataError, match="does not parse: action block at 1"):
        blocks_by_kind(np.array(short_action), action_dim=2, state_dim=S)


def test_action_blocks_parse_back_and_list_every_problem():
    bins = np.array([[1, 2], [256, 9]])
    back, problems = parse_action_blocks(action_blocks(bins), 2, 2)
    assert problems == [] and back.tolist() == bins.tolist()
    tokens = np.array([5, vocab.ACTION_START, 10006, 10007, vocab.ACTION_END,
                       vocab.ACTION_START, 10006, 7])
    back, problems = parse_action_blocks(tokens, 2, 2)
    assert back.tolist() == [[1, 2]]
    assert problems == ["1 token(s) outside action blocks at positions 0..0: [5]",
                        "action block 1 is not closed by ACTION_END",
                        "action block 1 holds non-bin token(s) [7]",
                        "1 well-formed action blocks, expected K=2"]
