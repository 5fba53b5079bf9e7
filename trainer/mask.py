"""The attention mask of SPEC.md 7 as a 4-D additive float mask that contains causality itself.

Rule: causal; padding keys are never attended; every action block (ACTION_START..ACTION_END) that
starts after the end of the last image block may not attend to any EARLIER action block. Each
action block still sees the whole prompt and itself causally; positions stay contiguous. World-model
input actions precede the response images, so they are unaffected.

    mask = attention_mask_4d(input_ids, attention_mask, dtype=torch.float32)  # (B, 1, L, L)
    rows = attention_mask_4d(ids, start=n_cached)   # (B, 1, L - n_cached, L): decoding with a cache

Generation uses the same function as training: the rows of the tokens not yet in the KV cache.
"""

from __future__ import annotations

import torch

from shards import vocab


def action_blocks(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) ids -> (block number per position, 0 outside action blocks; block start position)."""
    is_start = ids == vocab.ACTION_START
    is_end = ids == vocab.ACTION_END
    starts = torch.cumsum(is_start.long(), dim=1)
    ends_before = torch.cumsum(is_end.long(), dim=1) - is_end.long()
    inside = starts > ends_before
    pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    start_pos = torch.cummax(torch.where(is_start, pos, torch.full_like(pos, -1)), dim=1).values
    return torch.where(inside, starts, torch.zeros_like(starts)), start_pos


def may_attend(ids: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Bool (B, L, L): query i may attend key j."""
    b, n = ids.shape
    valid = torch.ones_like(ids, dtype=torch.bool) if valid is None else valid.bool()
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool, device=ids.device))
    block, start_pos = action_blocks(ids)
    pos = torch.arange(n, device=ids.device).expand(b, n)
    last_img_end = torch.where(ids == vocab.IMAGE_END, pos, torch.full_like(pos, -1)).max(1).values
    restricted = (block > 0) & (start_pos > last_img_end[:, None])
    qb = torch.where(restricted, block, torch.zeros_like(block))
    blocked = (qb[:, :, None] > 0) & (block[:, None, :] > 0) & (block[:, None, :] < qb[:, :, None])
    allowed = causal[None] & valid[:, None, :] & ~blocked
    return allowed | torch.eye(n, dtype=torch.bool, device=ids.device)[None]  # no empty rows


def attention_mask_4d(ids: torch.Tensor, valid: torch.Tensor | None = None,
                      dtype: torch.dtype = torch.float32, start: int = 0) -> torch.Tensor:
    """Additive float mask (B, 1, L - start, L): 0 where attending is allowed, the dtype's min
    elsewhere; rows are the query positions start.. (start > 0: the tokens after a KV cache).
    (A boolean 4-D mask is silently wrong under eager attention; an additive one is right under
    both eager and sdpa.)"""
    allowed = may_attend(ids, valid)[:, start:]
    out = torch.zeros(allowed.shape, dtype=dtype, device=ids.device)
    return out.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]
