"""The attention mask of SPEC.md 7, element by element on hand-built sequences."""

from __future__ import annotations

import torch

from shards import vocab as v
from trainer.mask import attention_mask_4d, may_attend

A0, A1 = v.ACTION_BIN_BASE + 1, v.ACTION_BIN_BASE + 2


def _causal(n: int) -> torch.Tensor:
    return torch.tril(torch.ones(n, n, dtype=torch.bool))


def test_vla_response_blocks_do_not_see_earlier_blocks():
    # 0:BOS 1:text 2:IMG_START 3:code 4:IMG_END 5:SEP | 6..9 block 1 | 10..13 block 2 | 14:SEP
    ids = torch.tensor([[v.BOS, 16010, v.IMAGE_START, 9, v.IMAGE_END, v.SEP,
                         v.ACTION_START, A0, A1, v.ACTION_END,
                         v.ACTION_START, A1, A0, v.ACTION_END, v.SEP]])
    got = may_attend(ids)[0]
    expected = _causal(15)
    expected[10:14, 6:10] = False          # block 2 never sees block 1
    assert torch.equal(got, expected)


def test_world_model_input_action_is_unaffected():
    # prompt image, input action block, response image: the action precedes the last image
    ids = torch.tensor([[v.BOS, v.IMAGE_START, 9, v.IMAGE_END, v.ACTION_START, A0, v.ACTION_END,
                         v.SEP, v.IMAGE_START, 10, v.IMAGE_END, v.SEP]])
    assert torch.equal(may_attend(ids)[0], _causal(12))


def test_three_blocks_and_the_final_separator():
    ids = torch.tensor([[v.BOS, v.IMAGE_START, v.IMAGE_END, v.SEP,
                         v.ACTION_START, A0, v.ACTION_END,        # 4..6
                         v.ACTION_START, A0, v.ACTION_END,        # 7..9
                         v.ACTION_START, A0, v.ACTION_END,        # 10..12
                         v.SEP]])
    expected = _causal(14)
    expected[7:10, 4:7] = False
    expected[10:13, 4:10] = False
    assert torch.equal(may_attend(ids)[0], expected)             # final SEP sees everything


def test_padding_keys_are_masked_and_rows_never_empty():
    ids = torch.tensor([[v.BOS, 16010, v.SEP, v.PAD, v.PAD]])
    valid = torch.tensor([[1, 1, 1, 0, 0]])
    got = may_attend(ids, valid)[0]
    assert not got[:3, 3:].any()
    assert got[3, 3] and got[4, 4] and not got[4, 3]            # padding rows see only themselves


def test_additive_form_matches_the_boolean_rule():
    ids = torch.tensor([[v.BOS, v.IMAGE_END, v.ACTION_START, A0, v.ACTION_END,
                         v.ACTION_START, A0, v.ACTION_END]])
    add = attention_mask_4d(ids, dtype=torch.float32)
    assert add.shape == (1, 1, 8, 8)
    allowed = may_attend(ids)
    assert torch.equal(add[:, 0] == 0, allowed)
    assert bool((add[:, 0][~allowed] == torch.finfo(torch.float32).min).all())


def test_rows_after_a_kv_cache_are_the_full_mask_rows():
    ids = torch.tensor([[v.BOS, v.IMAGE_START, v.IMAGE_END, v.SEP, v.ACTION_START, A0,
                         v.ACTION_END, v.ACTION_START, A1]])
    full = attention_mask_4d(ids)
    assert attention_mask_4d(ids, start=7).shape == (1, 1, 2, 9)
    assert torch.equal(attention_mask_4d(ids, start=7), full[:, :, 7:])
