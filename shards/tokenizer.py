"""Text tokenizer and image-code map of the unified vocabulary (SPEC.md 4).

`load_text_tokenizer(path)` reads a Chameleon `text_tokenizer.json` with the `tokenizers` library.
The codebook index -> token id map of image codes is PARSED from the 8192 `IMGIMG...` token names
(`IMGIMG` + letters A..J for the digits of the codebook index + one trailing character); it is
never assumed to be an offset. `load_text_tokenizer(None)` returns a built-in fallback (nothing can
be downloaded here): every special id of SPEC.md 4 stays where it is, image code c -> id 4 + c,
and text is UTF-8 bytes mapped to `FALLBACK_TEXT_BASE + byte`, a range disjoint from every
special id (`special_mask`). The console warns whenever the fallback is used.

    from shards.tokenizer import load_text_tokenizer
    tok = load_text_tokenizer("ckpts/chameleon/tokenizer/text_tokenizer.json")
    ids = tok.encode("What action should the robot take to pick up the bowl?")  # no BOS/EOS
    token_id = tok.image_code_to_id[code]; code = tok.id_to_image_code[token_id]
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from tokenizers import Tokenizer

from pipeline.errors import DataError
from pipeline.io import sha256_file
from pipeline.progress import console
from shards import vocab
from shards.records import TokenizerRecord

IMAGE_NAME_PREFIX = "IMGIMG"
IMAGE_NAME_DIGITS = "ABCDEFGHIJ"          # letter i stands for digit i
RESERVED_NAME = re.compile(r"<reserved(\d{5})>")
MAX_GRID_N = 128                           # grid tokens 8804 + n for images up to 4096 px

# Every id the layout gives a meaning to, as inclusive ranges. Text must avoid all of them.
SPECIAL_RANGES: tuple[tuple[int, int], ...] = (
    (vocab.BOS, 3),                                        # <s>, <pad>, </s>, <unk>
    (vocab.IMAGE_CODE_FIRST, vocab.IMAGE_CODE_LAST),       # image codes
    (vocab.IMAGE_END, vocab.IMAGE_END),
    (vocab.IMAGE_START, vocab.IMAGE_START),
    (vocab.SEP, vocab.SEP),
    (vocab.IMAGE_ROW_END, vocab.IMAGE_ROW_END),
    (vocab.IMAGE_GRID_BASE, vocab.IMAGE_GRID_BASE + MAX_GRID_N),
    (vocab.ACTION_START, vocab.ACTION_END),                # markers and every action bin
    (vocab.STATE_START, vocab.STATE_END),                  # markers and every state bin
)
FALLBACK_TEXT_BASE = max(hi for _, hi in SPECIAL_RANGES) + 1   # 16005: above every special id
FALLBACK_DIGEST = "fallback-bytes-v1"


def special_mask(ids: np.ndarray) -> np.ndarray:
    """True where an id is one of the special ids / blocks of SPEC.md 4 (never text)."""
    ids = np.asarray(ids)
    out = np.zeros(ids.shape, dtype=bool)
    for lo, hi in SPECIAL_RANGES:
        out |= (ids >= lo) & (ids <= hi)
    return out


@dataclass(frozen=True)
class TextTokenizer:
    """Text -> ids (no BOS/EOS) plus the image-code map of one vocabulary file."""

    kind: str                          # "chameleon" or "fallback"
    digest: str                        # sha256 of the json file; FALLBACK_DIGEST for the fallback
    image_code_to_id: np.ndarray       # (8192,) int64: codebook index -> token id
    id_to_image_code: np.ndarray       # (65536,) int64: token id -> codebook index, -1 elsewhere
    _encode: Callable[[str], list[int]]
    path: str | None = None

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no BOS/EOS); raises if any id is special."""
        ids = [int(i) for i in self._encode(text)]
        bad = special_mask(np.asarray(ids, dtype=np.int64)) if ids else np.zeros(0, bool)
        if bad.any():
            raise DataError(f"text {text!r} tokenizes to special id(s) "
                            f"{sorted({ids[i] for i in np.flatnonzero(bad)})[:5]}; the "
                            f"{self.kind} tokenizer must keep text out of the special ranges")
        return ids

    @property
    def record(self) -> TokenizerRecord:
        """What the shard manifest and checkpoint card record about the tokenizer."""
        return TokenizerRecord(kind=self.kind, digest=self.digest, path=self.path)


# ---------------------------------------------------------------------------------------------
# Image-code map (pure).
# ---------------------------------------------------------------------------------------------

def image_code_of_name(name: str) -> int:
    """Codebook index of an `IMGIMG<letters><one char>` token name."""
    body = name[len(IMAGE_NAME_PREFIX):-1]
    if not name.startswith(IMAGE_NAME_PREFIX) or not body or \
            any(c not in IMAGE_NAME_DIGITS for c in body):
        raise DataError(f"image token name {name!r} is not IMGIMG + letters A..J + one character")
    return int("".join(str(IMAGE_NAME_DIGITS.index(c)) for c in body))


def image_code_name(code: int) -> str:
    """The `IMGIMG` token name of a codebook index (trailing character `Z`, as Chameleon's)."""
    return IMAGE_NAME_PREFIX + "".join(IMAGE_NAME_DIGITS[int(c)] for c in str(int(code))) + "Z"


def image_code_map(vocab_map: dict[str, int], where: str = "") -> np.ndarray:
    """(8192,) token id of every codebook index, from the `IMGIMG...` names of a vocabulary."""
    code_to_id = np.full(vocab.CODEBOOK_SIZE, -1, dtype=np.int64)
    for name, token_id in vocab_map.items():
        if not name.startswith(IMAGE_NAME_PREFIX):
            continue
        code = image_code_of_name(name)
        if code >= vocab.CODEBOOK_SIZE or code_to_id[code] != -1:
            raise DataError(f"image token {name!r}: codebook index {code} out of range or "
                            "repeated", file=where)
        if not vocab.IMAGE_CODE_FIRST <= token_id <= vocab.IMAGE_CODE_LAST:
            raise DataError(f"image token {name!r} has id {token_id}, outside "
                            f"{vocab.IMAGE_CODE_FIRST}..{vocab.IMAGE_CODE_LAST}", file=where)
        code_to_id[code] = token_id
    missing = int((code_to_id < 0).sum())
    if missing:
        raise DataError(f"{missing} of {vocab.CODEBOOK_SIZE} codebook indices have no IMGIMG "
                        "token; not a Chameleon text_tokenizer.json", file=where)
    return code_to_id


def invert_code_map(code_to_id: np.ndarray) -> np.ndarray:
    """(65536,) codebook index of every token id, -1 for ids that are not image codes."""
    out = np.full(vocab.VOCAB_SIZE, -1, dtype=np.int64)
    out[code_to_id] = np.arange(len(code_to_id))
    return out


def check_layout(vocab_map: dict[str, int], where: str) -> None:
    """BOS `<s>` at 0 and every `<reservedNNNNN>` at NNNNN + 4 (SPEC.md 4)."""
    if vocab_map.get("<s>") != vocab.BOS:
        raise DataError(f"<s> has id {vocab_map.get('<s>')}, expected {vocab.BOS}", file=where)
    for name, token_id in vocab_map.items():
        m = RESERVED_NAME.fullmatch(name)
        if m and token_id != vocab.reserved_id(int(m.group(1))):
            raise DataError(f"{name} has id {token_id}, expected "
                            f"{vocab.reserved_id(int(m.group(1)))}", file=where)


# ---------------------------------------------------------------------------------------------
# Loading.
# ---------------------------------------------------------------------------------------------

def load_text_tokenizer(path: str | Path | None) -> TextTokenizer:
    """The Chameleon tokenizer at `path`, or the built-in fallback when `path` is None."""
    if path is None:
        return fallback_tokenizer()
    path = Path(path)
    if not path.is_file():
        raise DataError("text tokenizer file does not exist; set conv.tokenizer_path to "
                        "Chameleon's text_tokenizer.json (or none for the fallback)",
                        file=str(path))
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # the tokenizers library raises a plain Exception on bad files
        raise DataError(f"cannot read tokenizer: {exc}", file=str(path)) from exc
    vocab_map = tok.get_vocab(with_added_tokens=True)
    check_layout(vocab_map, str(path))
    code_to_id = image_code_map(vocab_map, str(path))
    return TextTokenizer(kind="chameleon", digest=sha256_file(path), image_code_to_id=code_to_id,
                         id_to_image_code=invert_code_map(code_to_id),
                         _encode=lambda text: tok.encode(text, add_special_tokens=False).ids,
                         path=str(path))


class TokenizerMismatch(DataError):
    """The tokenizer a record names is not available, or the one given has another digest."""


def load_tokenizer_from_record(record: TokenizerRecord, path: str | Path | None = None
                               ) -> TextTokenizer:
    """The text tokenizer a manifest or card record names: `path` when given, else the fallback
    or the recorded file. Raises `TokenizerMismatch` when the record's file is not available or
    the tokenizer's digest differs from the record's (its text and image ids would mean other
    tokens)."""
    if path is None and record.kind == "fallback":
        tok = fallback_tokenizer(warn=False)
    elif path is None and record.path and Path(record.path).is_file():
        tok = load_text_tokenizer(record.path)
    elif path is None:
        raise TokenizerMismatch(f"these tokens were made with the Chameleon tokenizer (sha256 "
                                f"{record.digest}) and {record.path!r} is not available; pass "
                                "tokenizer_path / --tokenizer-path")
    else:
        tok = load_text_tokenizer(path)
    if tok.digest != record.digest:
        raise TokenizerMismatch(f"tokenizer {path or record.path or tok.kind} has digest "
                                f"{tok.digest}, but the tokens were made with {record.digest}: "
                                "its text and image ids would mean other tokens; pass the "
                                "tokenizer used to build the shards")
    return tok


def fallback_encode(text: str) -> list[int]:
    """UTF-8 bytes -> FALLBACK_TEXT_BASE + byte (lossless, disjoint from every special id)."""
    return [FALLBACK_TEXT_BASE + b for b in text.encode("utf-8")]


def fallback_decode(ids: list[int]) -> str:
    return bytes(i - FALLBACK_TEXT_BASE for i in ids).decode("utf-8", errors="replace")


def fallback_tokenizer(warn: bool = True) -> TextTokenizer:
    """Identity-ordered image codes (c -> 4 + c) and byte-level text above the special ids."""
    if warn:
        console.print("[bold yellow]WARNING[/]: no Chameleon text_tokenizer.json given "
                      "(conv.tokenizer_path): using the built-in FALLBACK tokenizer (byte-level "
                      f"text at ids {FALLBACK_TEXT_BASE}..{FALLBACK_TEXT_BASE + 255}, image code c "
                      "-> 4 + c). Shards are not compatible with a Chameleon checkpoint's text.")
    code_to_id = vocab.IMAGE_CODE_FIRST + np.arange(vocab.CODEBOOK_SIZE, dtype=np.int64)
    return TextTokenizer(kind="fallback", digest=FALLBACK_DIGEST, image_code_to_id=code_to_id,
                         id_to_image_code=invert_code_map(code_to_id), _encode=fallback_encode)
