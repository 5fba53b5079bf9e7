"""VLA and world-model conversations as token sequences with target spans (SPEC.md 6). Pure: no I/O.

Sequence = BOS + human turn + SEP + response + SEP (no role words). The training targets are the
response and its final SEP: one half-open span `[len(BOS + human + SEP), len(sequence))`.

- VLA at step j (history M frames including the current one, chunk K): human = the text of
  `"What action should the robot take to " + instruction + "?"` (tokenized as ONE string, so BPE
  merges across the instruction boundary exactly as a single prompt would), then the state block
  of state j, then the image blocks [front_i, wrist_i] for i = max(0, j-M+1) .. j (only the frames
  that exist; no padding). Response = the K action blocks of a_j .. a_{j+K-1}. Steps with fewer
  than K actions left are skipped. The sample also carries the normalized action chunk (K, D)
  float32 in [-1, 1] (the continuous-head target, SPEC.md 9.7).
- World model at step j = 0 .. T-2: human = WM_PROMPT text, then [front_j, wrist_j], then the
  action block of a_j; response = [front_{j+1}, wrist_{j+1}].
- Relative actions (`conv.relative_action_dims`, LeRobot recipe): the VLA chunk is
  `pipeline.actions.relative_chunk(actions, states, j, K, dims)`; the world-model action a_j is the
  first row of the same transform (relative to state j), so one stats artifact serves both.
  With `conv.drop_static_chunks`, VLA steps whose chunk is static are dropped and counted.
- `Rules` (compat=published, SPEC.md 1.2): the published static rule (`sum |chunk| == 0` over the
  tokenized chunk, see `pipeline.actions.is_published_static`), float32 relative arithmetic, and
  per-camera world-model samples: over the VALID frames only (the VLA steps kept: a full chunk left
  and not static), renumbered, a front-only `[front_v] + a_v -> [front_next_v]` then a wrist-only
  sample for each valid frame but the last. World-model image blocks may differ from the VLA ones
  (`EpisodeTokens.wm_images`: the published world-model fitting keeps the aspect ratio).
- A sequence longer than `conv.max_seq_len` raises (`too_long="error"`) or is dropped and counted
  (`"drop"`); never truncated.

    from shards.conversation import episode_tokens, episode_samples
    ep = episode_tokens("ep0", "pick up the bowl", codes, actions, states, tok, codec)
    for sample in episode_samples(ep, codec, cfg.conv, drops): ...
    segs, problems = split_blocks(sample.tokens, action_dim=7, state_dim=8)   # reading back
    codes = parse_image_block(sample.tokens[s:e], tok.id_to_image_code)       # one image block
    bins, problems = parse_action_blocks(response, k, d)                      # a response

Each builder has its parser beside it (the inverse; `shards.vocab` holds the action / state
block pair): `split_blocks` cuts a sequence into typed segments, `parse_image_block` gives an
image block's grid back, `parse_action_blocks` a response's K x D bins (listing every problem).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple

import numpy as np

from pipeline.actions import is_published_static, is_static_chunk, relative_chunk
from pipeline.config import ConvConfig
from pipeline.errors import DataError
from shards import vocab
from shards.bins import Stats, normalize, to_bins

VLA, WM = "vla", "wm"
KINDS = (VLA, WM)
STATIC_CHUNK = "static_chunk"
TOO_LONG = "too_long"


@dataclass(frozen=True)
class Codec:
    """Per-dimension min/max and bin count that turn states and actions into bin ids."""

    state_min: np.ndarray
    state_max: np.ndarray
    action_min: np.ndarray
    action_max: np.ndarray
    num_bins: int = vocab.NUM_BINS
    relative_dims: tuple[int, ...] = ()
    relative_dtype: type = np.float64     # float32: the published arithmetic (compat)

    @classmethod
    def from_stats(cls, stats: Stats, num_bins: int, relative_dims: tuple[int, ...],
                   relative_dtype: type = np.float64) -> "Codec":
        return cls(stats.state.min, stats.state.max, stats.action.min, stats.action.max,
                   num_bins, tuple(relative_dims), relative_dtype)

    def state_bins(self, states: np.ndarray) -> np.ndarray:
        return to_bins(normalize(states, self.state_min, self.state_max), self.num_bins)

    def action_norm(self, actions: np.ndarray) -> np.ndarray:
        return normalize(actions, self.action_min, self.action_max)


@dataclass(frozen=True, kw_only=True)
class Rules:
    """Sample rules that differ from the project's defaults under compat=published."""

    published_static: bool = False      # sum |chunk| == 0 instead of conv.static_threshold
    per_camera_wm: bool = False         # SO100: front-only and wrist-only world-model samples


DEFAULT_RULES = Rules()


@dataclass(frozen=True)
class EpisodeTokens:
    """The pieces of one episode every sample is cut from."""

    episode: str
    instruction: str
    vla_prompt: np.ndarray      # text ids of the VLA prompt
    wm_prompt: np.ndarray       # text ids of the world-model prompt
    images: np.ndarray          # (T, 2, block) image blocks per frame and view (front, wrist)
    state_blocks: np.ndarray    # (T, S + 2)
    actions: np.ndarray         # (T, D) raw actions
    states: np.ndarray          # (T, S) raw states
    wm_images: np.ndarray | None = field(default=None)  # world-model blocks when they differ

    @property
    def wm_blocks(self) -> np.ndarray:
        return self.images if self.wm_images is None else self.wm_images

    @property
    def steps(self) -> int:
        return len(self.actions)


@dataclass(frozen=True)
class ConvSample:
    kind: str
    episode: str
    step: int
    tokens: np.ndarray                  # int64 (L,)
    targets: list[list[int]]            # half-open target spans
    chunk: np.ndarray | None = None     # VLA: float32 (K, D) in [-1, 1]


# ---------------------------------------------------------------------------------------------
# Blocks.
# ---------------------------------------------------------------------------------------------

def image_block(codes: np.ndarray, code_to_id: np.ndarray, side_px: int | None = None
                ) -> np.ndarray:
    """codes (h, w) -> [IMAGE_START, grid(H), grid(W), row codes, ROW_END, ..., IMAGE_END]."""
    return image_blocks(np.asarray(codes)[None], code_to_id, side_px)[0]


def image_blocks(codes: np.ndarray, code_to_id: np.ndarray, side_px: int | None = None
                 ) -> np.ndarray:
    """codes (..., h, w) -> image blocks (..., 3 + h (w + 1) + 1), vectorized."""
    codes = np.asarray(codes)
    h, w = codes.shape[-2:]
    if side_px is not None and (h * vocab.VQ_DOWNSAMPLE, w * vocab.VQ_DOWNSAMPLE) != (side_px,) * 2:
        raise DataError(f"codes grid {h}x{w} does not match {side_px} px images "
                        f"({side_px // vocab.VQ_DOWNSAMPLE} codes per side)")
    lead = codes.shape[:-2]
    ids = np.asarray(code_to_id, dtype=np.int64)[codes.astype(np.int64)]
    rows = np.concatenate([ids, np.full((*lead, h, 1), vocab.IMAGE_ROW_END)], axis=-1)
    head = [vocab.IMAGE_START, vocab.grid_token(h * vocab.VQ_DOWNSAMPLE),
            vocab.grid_token(w * vocab.VQ_DOWNSAMPLE)]
    return np.concatenate([np.broadcast_to(np.asarray(head, np.int64), (*lead, 3)),
                           rows.reshape(*lead, h * (w + 1)),
                           np.full((*lead, 1), vocab.IMAGE_END)], axis=-1)


def action_blocks(bins: np.ndarray) -> np.ndarray:
    """bins (K, D) -> the K action blocks concatenated."""
    return np.concatenate([vocab.action_block(b) for b in np.asarray(bins)])


def assemble(human: list[np.ndarray], response: list[np.ndarray]) -> tuple[np.ndarray, list]:
    """BOS + human + SEP + response + SEP, and the target span of the response and final SEP."""
    head = np.concatenate([[vocab.BOS], *human, [vocab.SEP]]).astype(np.int64)
    tokens = np.concatenate([head, *response, [vocab.SEP]]).astype(np.int64)
    return tokens, [[len(head), len(tokens)]]


# ---------------------------------------------------------------------------------------------
# Parsing: the inverses of the builders above, used wherever blocks are read back.
# ---------------------------------------------------------------------------------------------

SEGMENT_KINDS = ("text", "state", "image", "action", "sep")


class Segment(NamedTuple):
    kind: str       # "text", "state", "image", "action" or "sep"
    start: int
    end: int        # half-open


def image_block_length(tokens: np.ndarray, i: int) -> int:
    """Length of the image block starting at i, read from its grid tokens (0 when unreadable)."""
    if i + 2 >= len(tokens):
        return 0
    grid = np.asarray(tokens[i + 1:i + 3], dtype=np.int64) - vocab.IMAGE_GRID_BASE
    if (grid < 1).any() or (grid > 64).any():
        return 0
    h, w = vocab.block_grid(tokens[i + 1], tokens[i + 2])
    return 3 + h * (w + 1) + 1


def split_blocks(tokens: np.ndarray, *, action_dim: int, state_dim: int, start: int = 1
                 ) -> tuple[list[Segment], list[str]]:
    """A token sequence from `start` on (1: after BOS) -> its segments in order, and the problem
    that stopped the parse (none for a well-formed sequence). Image blocks take the length their
    grid tokens say, action / state blocks D + 2 / S + 2 tokens; each must end with its end
    marker. Text runs to the next block or SEP. Block contents are not checked here."""
    blocks = {vocab.IMAGE_START: ("image", 0, vocab.IMAGE_END),
              vocab.ACTION_START: ("action", action_dim + 2, vocab.ACTION_END),
              vocab.STATE_START: ("state", state_dim + 2, vocab.STATE_END)}
    segs: list[Segment] = []
    i, n = start, len(tokens)
    while i < n:
        t = int(tokens[i])
        if t in blocks:
            kind, length, end = blocks[t]
            if kind == "image":
                length = image_block_length(tokens, i)
            if i + length > n or tokens[i + length - 1] != end:
                return segs, [f"{kind} block at {i} is not {length} tokens closed by {end}"]
            segs.append(Segment(kind, i, i + length))
            i += length
        elif t == vocab.SEP:
            segs.append(Segment("sep", i, i + 1))
            i += 1
        else:
            j = i
            while j < n and int(tokens[j]) not in blocks and tokens[j] != vocab.SEP:
                j += 1
            segs.append(Segment("text", i, j))
            i = j
    return segs, []


def blocks_by_kind(tokens: np.ndarray, *, action_dim: int, state_dim: int, start: int = 1
                   ) -> dict[str, list[np.ndarray]]:
    """The blocks of a well-formed sequence by segment kind, each list in order (every kind a
    key, empty when absent); DataError when the sequence does not parse."""
    tokens = np.asarray(tokens, dtype=np.int64)
    segs, problems = split_blocks(tokens, action_dim=action_dim, state_dim=state_dim, start=start)
    if problems:
        raise DataError(f"token sequence does not parse: {problems[0]}")
    out: dict[str, list[np.ndarray]] = {k: [] for k in SEGMENT_KINDS}
    for kind, s, e in segs:
        out[kind].append(tokens[s:e])
    return out


def parse_image_block(block: np.ndarray, id_to_code: np.ndarray | None = None) -> np.ndarray:
    """One image block -> its (rows, cols) grid (shape from its grid tokens): codebook indices
    through `id_to_code` (the tokenizer's id -> code map), or the token ids when it is None. The
    inverse of `image_block`. DataError when the block is malformed or (with a map) holds an id
    that is no image code."""
    block = np.asarray(block, dtype=np.int64)
    n = image_block_length(block, 0) if len(block) and block[0] == vocab.IMAGE_START else 0
    if n == 0 or n != len(block) or block[-1] != vocab.IMAGE_END:
        raise DataError(f"not an image block of the length its grid tokens give: "
                        f"{block[:5].tolist()}... ({len(block)} tokens)")
    h, w = vocab.block_grid(block[1], block[2])
    rows = block[3:-1].reshape(h, w + 1)
    if (rows[:, -1] != vocab.IMAGE_ROW_END).any():
        raise DataError("image row not closed by the row-end token")
    ids = rows[:, :-1]
    if id_to_code is None:
        return ids
    codes = np.asarray(id_to_code)[ids]
    if (codes < 0).any():
        raise DataError(f"image block holds non-image-code ids {ids[codes < 0][:5].tolist()}")
    return codes


def parse_action_blocks(tokens: np.ndarray, k: int, d: int) -> tuple[np.ndarray, list[str]]:
    """A response's tokens (up to and excluding SEP) -> (bins (n, d), problems); the inverse of
    `action_blocks`, lenient: generated responses may be malformed.

    The expected shape is exactly `k` blocks `[ACTION_START, d bin tokens, ACTION_END]` and
    nothing else. Every deviation is listed in `problems`; well-formed blocks are still returned.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    problems, blocks, i = [], [], 0
    while i < len(tokens):
        if tokens[i] != vocab.ACTION_START:
            j = i + int(np.argmax(np.append(tokens[i:], vocab.ACTION_START) == vocab.ACTION_START))
            problems.append(f"{j - i} token(s) outside action blocks at positions {i}..{j - 1}: "
                            f"{tokens[i:min(j, i + 5)].tolist()}{' ...' if j - i > 5 else ''}")
            i = j
            continue
        end, closed = _block_end(tokens, i)
        body = tokens[i + 1:end]
        problems += _block_problems(body, len(blocks), d, closed)
        if closed and len(body) == d and vocab.is_action_bin(body).all():
            blocks.append(body - vocab.ACTION_BIN_BASE)
        i = end + 1 if closed else end
    if len(blocks) != k:
        problems.append(f"{len(blocks)} well-formed action blocks, expected K={k}")
    bins = np.stack(blocks) if blocks else np.zeros((0, d), np.int64)
    return bins, problems


def _block_end(tokens: np.ndarray, start: int) -> tuple[int, bool]:
    """(index where the block's body ends, closed by ACTION_END?); a new ACTION_START or the end
    of the tokens also ends it, unclosed."""
    for j in range(start + 1, len(tokens)):
        if tokens[j] == vocab.ACTION_END:
            return j, True
        if tokens[j] == vocab.ACTION_START:
            return j, False
    return len(tokens), False


def _block_problems(body: np.ndarray, index: int, d: int, closed: bool) -> list[str]:
    out = []
    if not closed:
        out.append(f"action block {index} is not closed by ACTION_END")
    if len(body) != d:
        out.append(f"action block {index} has {len(body)} tokens inside, expected D={d}")
    bad = body[~vocab.is_action_bin(body)]
    if len(bad):
        out.append(f"action block {index} holds non-bin token(s) {bad[:5].tolist()}")
    return out


# ---------------------------------------------------------------------------------------------
# Episodes and samples.
# ---------------------------------------------------------------------------------------------

def vla_prompt_text(instruction: str) -> str:
    return vocab.VLA_PROMPT_PREFIX + instruction + vocab.VLA_PROMPT_SUFFIX


def episode_tokens(episode: str, instruction: str, codes: np.ndarray, actions: np.ndarray,
                   states: np.ndarray, tokenizer, codec: Codec,
                   wm_codes: np.ndarray | None = None) -> EpisodeTokens:
    """Tokenize what every sample of an episode shares. codes: (T, 2, h, w) codebook indices;
    wm_codes: the world-model codes (T, 2, h', w') when they differ (published fitting)."""
    if not len(codes) == len(actions) == len(states):
        raise DataError(f"codes ({len(codes)}), actions ({len(actions)}) and states "
                        f"({len(states)}) differ in length", episode=episode)
    if wm_codes is not None and len(wm_codes) != len(codes):
        raise DataError(f"world-model codes ({len(wm_codes)}) and codes ({len(codes)}) differ in "
                        "length", episode=episode)
    states_bins = codec.state_bins(states)
    return EpisodeTokens(
        episode=episode, instruction=instruction,
        vla_prompt=np.asarray(tokenizer.encode(vla_prompt_text(instruction)), np.int64),
        wm_prompt=np.asarray(tokenizer.encode(vocab.WM_PROMPT), np.int64),
        images=image_blocks(codes, tokenizer.image_code_to_id),
        state_blocks=np.stack([vocab.state_block(b) for b in states_bins]),
        actions=np.asarray(actions, np.float64), states=np.asarray(states, np.float64),
        wm_images=None if wm_codes is None else image_blocks(wm_codes,
                                                             tokenizer.image_code_to_id))


def action_chunk(ep: EpisodeTokens, codec: Codec, j: int, k: int) -> np.ndarray:
    """Normalized (k, D) action chunk a_j .. a_{j+k-1} (relative dims applied), in [-1, 1]."""
    return codec.action_norm(raw_chunk(ep, codec, j, k))


def raw_chunk(ep: EpisodeTokens, codec: Codec, j: int, k: int) -> np.ndarray:
    """(k, D) actions a_j .. a_{j+k-1} in robot units, relative dims applied."""
    return relative_chunk(ep.actions, ep.states, j, k, codec.relative_dims, codec.relative_dtype)


def frames(ep: EpisodeTokens, first: int, last: int, blocks: np.ndarray | None = None
           ) -> list[np.ndarray]:
    """Image blocks [front_i, wrist_i] for i = first .. last (of `blocks`, default the VLA ones)."""
    blocks = ep.images if blocks is None else blocks
    return [blocks[i, v] for i in range(first, last + 1) for v in range(blocks.shape[1])]


def vla_sample(ep: EpisodeTokens, codec: Codec, j: int, history: int, chunk: int) -> ConvSample:
    if j + chunk > ep.steps:
        raise ValueError(f"step {j} has fewer than {chunk} actions left (T={ep.steps})")
    norm = action_chunk(ep, codec, j, chunk)
    human = [ep.vla_prompt, ep.state_blocks[j], *frames(ep, max(0, j - history + 1), j)]
    tokens, targets = assemble(human, [action_blocks(to_bins(norm, codec.num_bins))])
    return ConvSample(VLA, ep.episode, j, tokens, targets, norm.astype(np.float32))


def wm_sample(ep: EpisodeTokens, codec: Codec, j: int) -> ConvSample:
    if j + 1 >= ep.steps:
        raise ValueError(f"step {j} has no next frame (T={ep.steps})")
    action = to_bins(action_chunk(ep, codec, j, 1), codec.num_bins)
    blocks = ep.wm_blocks
    tokens, targets = assemble([ep.wm_prompt, *frames(ep, j, j, blocks), action_blocks(action)],
                               frames(ep, j + 1, j + 1, blocks))
    return ConvSample(WM, ep.episode, j, tokens, targets)


def camera_wm_sample(ep: EpisodeTokens, codec: Codec, j: int, nxt: int, view: int,
                     number: int) -> ConvSample:
    """Published SO100 world-model sample of one camera: [view_j] + a_j -> [view_nxt]. Its step
    is `number` = 2 * (valid-frame index) + view (front even, wrist odd): keys stay unique."""
    action = to_bins(action_chunk(ep, codec, j, 1), codec.num_bins)
    blocks = ep.wm_blocks
    tokens, targets = assemble([ep.wm_prompt, blocks[j, view], action_blocks(action)],
                               [blocks[nxt, view]])
    return ConvSample(WM, ep.episode, number, tokens, targets)


def check_length(sample: ConvSample, conv: ConvConfig, drops: Counter) -> bool:
    """True when the sample fits; otherwise raise or count the drop (never truncate)."""
    if len(sample.tokens) <= conv.max_seq_len:
        return True
    if conv.too_long == "error":
        raise DataError(f"{sample.kind} sample at step {sample.step} has {len(sample.tokens)} "
                        f"tokens > conv.max_seq_len={conv.max_seq_len}; raise conv.max_seq_len, "
                        "lower conv.history / conv.chunk / image.resolution, or set "
                        "conv.too_long=drop", episode=sample.episode)
    drops[(sample.kind, TOO_LONG)] += 1
    return False


def is_static(ep: EpisodeTokens, codec: Codec, conv: ConvConfig, rules: Rules, j: int) -> bool:
    if not conv.drop_static_chunks:
        return False
    if rules.published_static:
        return is_published_static(raw_chunk(ep, codec, j, conv.chunk))
    return is_static_chunk(ep.actions, ep.states, j, conv.chunk, conv.static_threshold)


def valid_steps(ep: EpisodeTokens, codec: Codec, conv: ConvConfig, rules: Rules,
                drops: Counter | None = None) -> list[int]:
    """VLA steps with a full chunk left that are not static (drops counted when given)."""
    out = []
    for j in range(ep.steps - conv.chunk + 1):
        if is_static(ep, codec, conv, rules, j):
            if drops is not None:
                drops[(VLA, STATIC_CHUNK)] += 1
            continue
        out.append(j)
    return out


def vla_samples(ep: EpisodeTokens, codec: Codec, conv: ConvConfig,
                drops: Counter, rules: Rules = DEFAULT_RULES) -> Iterator[ConvSample]:
    for j in valid_steps(ep, codec, conv, rules, drops):
        sample = vla_sample(ep, codec, j, conv.history, conv.chunk)
        if check_length(sample, conv, drops):
            yield sample


def wm_samples(ep: EpisodeTokens, codec: Codec, conv: ConvConfig,
               drops: Counter, rules: Rules = DEFAULT_RULES) -> Iterator[ConvSample]:
    if rules.per_camera_wm:
        valid = valid_steps(ep, codec, conv, rules)
        views = ep.wm_blocks.shape[1]
        pairs = [(j, nxt, view, i * views + view)
                 for i, (j, nxt) in enumerate(zip(valid, valid[1:])) for view in range(views)]
        candidates = (camera_wm_sample(ep, codec, *pair) for pair in pairs)
    else:
        candidates = (wm_sample(ep, codec, j) for j in range(ep.steps - 1))
    for sample in candidates:
        if check_length(sample, conv, drops):
            yield sample


def episode_samples(ep: EpisodeTokens, codec: Codec, conv: ConvConfig,
                    drops: Counter, rules: Rules = DEFAULT_RULES) -> Iterator[ConvSample]:
    """Every enabled sample of an episode: VLA steps in order, then world-model steps."""
    if conv.vla:
        yield from vla_samples(ep, codec, conv, drops, rules)
    if conv.world_model:
        yield from wm_samples(ep, codec, conv, drops, rules)
