"""The unified 65,536-id vocabulary (Chameleon layout, SPEC.md 4). Every special id is named here once.

    from shards import vocab
    vocab.action_block(bins)   # [10004, 10005+d..., 15004]
    vocab.parse_action_block(block)   # its inverse: the bins back (DataError when malformed)
"""

from __future__ import annotations

import numpy as np

from pipeline.errors import DataError

VOCAB_SIZE = 65536

BOS = 0                 # <s>; also right padding (label -100)
PAD = BOS
IMAGE_CODE_FIRST = 4    # image codes occupy 4 .. 8195 (codebook 8192); the map is NOT an offset
IMAGE_CODE_LAST = 8195
CODEBOOK_SIZE = 8192
IMAGE_END = 8196
IMAGE_START = 8197
SEP = 8710              # turn separator, also end of generation
IMAGE_ROW_END = 8803    # "newline" after each row of image codes
IMAGE_GRID_BASE = 8804  # grid size token = 8804 + side/32 (256 px -> 8812, 512 px -> 8820)
PATCH_PX = 32           # one grid unit per 32 px
VQ_DOWNSAMPLE = 16      # VQ-GAN: one code per 16x16 pixels

ACTION_START = 10004
ACTION_BIN_BASE = 10005  # bin d (1..256) -> 10005 + d
ACTION_END = 15004
STATE_START = 15504
STATE_BIN_BASE = 15505   # bin d (1..256) -> 15505 + d
STATE_END = 16004
NUM_BINS = 256

IGNORE_INDEX = -100     # label of unsupervised positions

VLA_PROMPT_PREFIX = "What action should the robot take to "
VLA_PROMPT_SUFFIX = "?"
WM_PROMPT = ("Generate the next image based on the provided sequence of historical images and "
             "corresponding actions.")


def reserved_id(n: int) -> int:
    """`<reservedNNNNN>` has id NNNNN + 4."""
    return n + 4


def grid_token(side_px: int) -> int:
    return IMAGE_GRID_BASE + side_px // PATCH_PX


def image_block_len(side_px: int) -> int:
    """Tokens in one image block: start, 2 grid tokens, rows x (codes + row end), end."""
    n = side_px // VQ_DOWNSAMPLE
    return 3 + n * (n + 1) + 1


def block_grid(height_token: int, width_token: int) -> tuple[int, int]:
    """(rows, cols) of VQ codes of an image block from its two grid tokens (8804 + side/32)."""
    per = PATCH_PX // VQ_DOWNSAMPLE
    return (int(height_token) - IMAGE_GRID_BASE) * per, (int(width_token) - IMAGE_GRID_BASE) * per


def action_block(bins: np.ndarray) -> np.ndarray:
    """bins: (D,) ints in 1..256 -> [ACTION_START, ACTION_BIN_BASE + d..., ACTION_END]."""
    return _block(bins, ACTION_START, ACTION_BIN_BASE, ACTION_END)


def state_block(bins: np.ndarray) -> np.ndarray:
    return _block(bins, STATE_START, STATE_BIN_BASE, STATE_END)


def _block(bins: np.ndarray, start: int, base: int, end: int) -> np.ndarray:
    bins = np.asarray(bins, dtype=np.int64)
    if bins.size and (bins.min() < 1 or bins.max() > NUM_BINS):
        raise ValueError(f"bin indices must be in 1..{NUM_BINS}, got {bins.min()}..{bins.max()}")
    return np.concatenate([[start], base + bins, [end]]).astype(np.int64)


def parse_action_block(block: np.ndarray) -> np.ndarray:
    """One action block [ACTION_START, 10005 + d..., ACTION_END] -> its bins d (D,) in 1..256;
    the inverse of `action_block`. Raises DataError naming what is wrong."""
    return _parse_block(block, ACTION_START, ACTION_BIN_BASE, ACTION_END, "action")


def parse_state_block(block: np.ndarray) -> np.ndarray:
    """One state block -> its bins (S,); the inverse of `state_block`."""
    return _parse_block(block, STATE_START, STATE_BIN_BASE, STATE_END, "state")


def _parse_block(block: np.ndarray, start: int, base: int, end: int, what: str) -> np.ndarray:
    block = np.asarray(block, dtype=np.int64)
    if len(block) < 2 or block[0] != start or block[-1] != end:
        raise DataError(f"{what} block {block[:5].tolist()}... is not opened by {start} and "
                        f"closed by {end}")
    bins = block[1:-1] - base
    if ((bins < 1) | (bins > NUM_BINS)).any():
        raise DataError(f"{what} block has ids outside its {NUM_BINS} bins")
    return bins


def action_bins_of(ids: np.ndarray) -> np.ndarray:
    """The bins (1..256) of every action-bin id in `ids`, in order (markers and other ids
    skipped): the K x D bins of a response, flattened."""
    ids = np.asarray(ids, dtype=np.int64)
    return ids[is_action_bin(ids)] - ACTION_BIN_BASE


def is_image_code(ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids)
    return (ids >= IMAGE_CODE_FIRST) & (ids <= IMAGE_CODE_LAST)


def is_action_bin(ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids)
    return (ids > ACTION_BIN_BASE) & (ids <= ACTION_BIN_BASE + NUM_BINS)


def is_state_bin(ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids)
    return (ids > STATE_BIN_BASE) & (ids <= STATE_BIN_BASE + NUM_BINS)
