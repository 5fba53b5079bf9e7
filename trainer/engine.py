"""The decoding engine: the attention rule at inference, cached greedy steps and the response
grammar of discrete actions (generated action blocks are parsed by
`shards.conversation.parse_action_blocks`, beside their builder).

    from trainer.engine import Backend, Stepper, response_grammar
    stepper = Stepper(backend, prompt_ids, use_cache=True)
    next_id = stepper.greedy(allowed=None)       # one token under the training mask

`Backend` wraps a model and device; `Stepper` appends tokens with a KV cache (or reruns the
sequence) under `trainer.mask.may_attend`, the training mask; `response_grammar(K, D)` is the
fixed shape of a discrete response. This module knows nothing of images, tokenizers or cards.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from shards import vocab
from shards.bins import from_bins
from trainer.mask import may_attend


def response_grammar(k: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """The fixed shape of a discrete response: (tokens, is_bin), K (D + 2) + 1 positions.

    `tokens` holds the one token the grammar allows at each structural position (ACTION_START,
    ACTION_END, the closing SEP) and 0 at the K x D bin positions, where `is_bin` is true.
    """
    block = np.array([vocab.ACTION_START, *[0] * d, vocab.ACTION_END], np.int64)
    tokens = np.append(np.tile(block, k), vocab.SEP)
    is_bin = np.append(np.tile([False, *[True] * d, False], k), False)
    return tokens, is_bin


def allowed_bins(num_bins: int) -> torch.Tensor:
    """Bool (V,) mask of the action-bin tokens of bins 1..num_bins."""
    mask = torch.zeros(vocab.VOCAB_SIZE, dtype=torch.bool)
    mask[vocab.ACTION_BIN_BASE + 1:vocab.ACTION_BIN_BASE + num_bins + 1] = True
    return mask


def bins_to_norm(bins: np.ndarray, num_bins: int) -> np.ndarray:
    """Bin ids (1..num_bins) -> normalized bin centres."""
    return from_bins(bins, num_bins)


def attention_rule(ids: np.ndarray, start: int = 0) -> np.ndarray:
    """Rows start.. of the (L, L) "may attend" matrix of one sequence: the training mask
    (`trainer.mask.may_attend`, SPEC.md 7), so generation attends exactly as training did."""
    ids_t = torch.as_tensor(np.asarray(ids, dtype=np.int64))[None]
    return may_attend(ids_t)[0, start:].numpy()


class Stepper:
    """Token-by-token decoding of one sequence under `attention_rule`.

    use_cache=True: the prompt runs once and each new token runs alone against the KV cache;
    use_cache=False: every step reruns the whole sequence (the baseline the bench compares).
    """

    def __init__(self, backend: "Backend", prompt: np.ndarray, *, use_cache: bool = True) -> None:
        self.backend, self.use_cache = backend, use_cache
        self.ids = [int(t) for t in np.asarray(prompt).reshape(-1)]
        self.cache = backend.new_cache() if use_cache else None
        self.done = 0                  # tokens already in the cache
        self.forwards = 0

    def next_logits(self) -> torch.Tensor:
        """Logits (V,) for the token after the current sequence."""
        start = self.done if self.use_cache else 0
        rows = torch.from_numpy(attention_rule(np.asarray(self.ids), start))
        hidden = self.backend.run(self.ids[start:], start, rows, self.cache)
        self.forwards += 1
        if self.use_cache:
            self.done = len(self.ids)
        return self.backend.logits(hidden[0, -1]).float()

    def append(self, token: int) -> None:
        self.ids.append(int(token))

    def greedy(self, allowed: torch.Tensor | None = None) -> int:
        """The argmax next token, restricted to `allowed` ids (a bool (V,) mask) if given."""
        logits = self.next_logits()
        if allowed is not None:
            logits = logits.masked_fill(~allowed.to(logits.device), float("-inf"))
        token = int(logits.argmax())
        self.append(token)
        return token


def additive_mask(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool (n, m) "may attend" rows -> additive float mask (1, 1, n, m) (safe for any attention)."""
    out = torch.zeros(rows.shape, dtype=dtype)
    return out.masked_fill(~rows, torch.finfo(dtype).min)[None, None]


@dataclass
class Backend:
    """The trained network seen through the four operations inference needs."""

    model: torch.nn.Module
    device: torch.device

    @torch.inference_mode()
    def run(self, ids: list[int], start: int, rows: torch.Tensor, cache) -> torch.Tensor:
        """Hidden states (1, n, H) of tokens `ids` at positions start.. (after the final norm)."""
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        pos = torch.arange(start, start + len(ids), device=self.device)[None]
        mask = additive_mask(rows, self.dtype).to(self.device)
        out = self.backbone(input_ids=x, attention_mask=mask, position_ids=pos, cache=cache,
                            use_cache=cache is not None)
        return out.last_hidden_state

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden)

    @torch.inference_mode()
    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states (1, L, H) of the context -> normalized actions (K, D)."""
        pad = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        return self.model.action_head(hidden, pad)[0]

    def new_cache(self):
        # transformers: seconds to import, only loading a model needs it
        from transformers.cache_utils import DynamicCache
        return DynamicCache(config=self.backbone.config)

    @property
    def backbone(self) -> torch.nn.Module:
        return self.model.backbone

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype
