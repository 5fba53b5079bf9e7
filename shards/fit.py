"""The published image fitting (compat=published, SPEC.md 5): crop sizes with their grid tokens,
PIL BOX halving, BICUBIC resize, crop.

The published item processors choose the crop size among a list of (32 wp, 32 hp) sizes of at
most (target/32)^2 patches and aspect ratio <= 4, enumerated by walking wp down from the patch
count while raising hp whenever (hp + 1) wp still fits (so 640 x 480 at 256 gets 288 x 224, not
256 x 192: 8 x 6 patches is never in the list); the size whose aspect best matches the image wins
(the first in list order on a tie; the published code picks one of the tied sizes at random, and
no tie occurs for the sizes tested). The image is halved with BOX while both sides are at least
twice the crop, resized with BICUBIC by max(cw/w, ch/h) (sides rounded) and cropped.

The crop offset is the ONE random step of the published code (Python `random`, uniform). Here it
is a hash of (image.crop_seed, episode, observation row, view): reproducible, uniform over the
same range, 0 when the resized image equals the crop. The VLA processor first resizes every image
to 256 x 256 (BICUBIC), so VLA images are always square; the world-model processor does not.

    from shards.fit import crop_size, fit_vla, fit_wm
    crop_size(640, 480, 256)                       # (288, 224): 9 x 7 patches
    fit_wm(frames, 256, ("seed0", "ep", row, "front"))   # (224, 288, 3) uint8 per frame
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import numpy as np
from PIL import Image

PATCH_PX = 32
MAX_RATIO = 4.0
VLA_SIDE = 256   # the published VLA processor's first resize
PUBLISHED_PREPROCESSING = (
    "published fitting (compat=published): VLA images PIL BICUBIC to 256 x 256, then fitted; "
    "world-model images fitted as they are: crop size of best aspect among (32 wp, 32 hp), "
    "PIL BOX halving while both sides >= 2x the crop, BICUBIC by max(cw/w, ch/h), crop at a "
    "hashed (image.crop_seed, episode, row, view) offset; x/255*2-1 in float32; NCHW")


@lru_cache(maxsize=None)
def crop_sizes(target: int) -> tuple[tuple[int, int], ...]:
    """The published (width, height) crop sizes for a target side, in the published order."""
    patches = (target // PATCH_PX) ** 2
    out, wp, hp = [], patches, 1
    while wp > 0:
        if max(wp, hp) / min(wp, hp) <= MAX_RATIO:
            out.append((wp * PATCH_PX, hp * PATCH_PX))
        if (hp + 1) * wp <= patches:
            hp += 1
        else:
            wp -= 1
    return tuple(out)


def crop_size(width: int, height: int, target: int) -> tuple[int, int]:
    """(crop width, crop height) for a width x height image: the best aspect match."""
    def match(size: tuple[int, int]) -> float:
        sx, sy = size[0] / width, size[1] / height
        return min(sx, sy) / max(sx, sy)
    sizes = crop_sizes(target)
    best = max(match(s) for s in sizes)
    return next(s for s in sizes if match(s) == best)


def offset(span: tuple[int, int], key: tuple) -> tuple[int, int]:
    """Deterministic (left, top) in [0, span_x] x [0, span_y] from a key (seed, episode, ...)."""
    if span == (0, 0):
        return 0, 0
    h = hashlib.sha256("\0".join(map(str, key)).encode()).digest()
    return (int.from_bytes(h[:8], "big") % (span[0] + 1),
            int.from_bytes(h[8:16], "big") % (span[1] + 1))


def fit_image(img: np.ndarray, target: int, key: tuple = ()) -> np.ndarray:
    """(H, W, 3) uint8 -> (ch, cw, 3) uint8, the published center_crop with a keyed offset."""
    pil = Image.fromarray(np.ascontiguousarray(img))
    cw, ch = crop_size(pil.width, pil.height, target)
    while pil.width >= 2 * cw and pil.height >= 2 * ch:
        pil = pil.resize((pil.width // 2, pil.height // 2), resample=Image.BOX)
    scale = max(cw / pil.width, ch / pil.height)
    pil = pil.resize((round(pil.width * scale), round(pil.height * scale)), resample=Image.BICUBIC)
    left, top = offset((pil.width - cw, pil.height - ch), key)
    return np.array(pil.crop((left, top, left + cw, top + ch)))   # writable


def fit_vla(img: np.ndarray, target: int) -> np.ndarray:
    """The published VLA processor: BICUBIC resize to 256 x 256, then fit (always square)."""
    square = Image.fromarray(np.ascontiguousarray(img)).resize((VLA_SIDE, VLA_SIDE),
                                                              resample=Image.BICUBIC)
    return fit_image(np.asarray(square), target)


def fit_wm(img: np.ndarray, target: int, key: tuple) -> np.ndarray:
    """The published world-model processor: fit the image as it is (aspect kept)."""
    return fit_image(img, target, key)


def wm_grid(height: int, width: int, target: int) -> tuple[int, int]:
    """(rows, cols) of VQ codes (16 px each) of a world-model image of a height x width frame."""
    cw, ch = crop_size(width, height, target)
    return ch // 16, cw // 16


def shares_fit(height: int, width: int) -> bool:
    """True when the VLA and world-model fittings give the same pixels for every target: a
    256 x 256 frame (the VLA resize is then the identity, and the crop is square)."""
    return (height, width) == (VLA_SIDE, VLA_SIDE)
