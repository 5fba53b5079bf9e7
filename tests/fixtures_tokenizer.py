"""Writes a small tokenizer file in the real Chameleon `text_tokenizer.json` format, for tests.

A byte-level BPE (the `tokenizers` library) trained on a few robot prompts, saved with `<s>` at 0,
`<pad>`, `</s>`, `<unk>` at 1..3, the 8192 `IMGIMG...` entries at the real ids 4..8195 with their
names assigned in SHUFFLED order (so codebook index != id - 4), `<reservedNNNNN>` at NNNNN + 4 for
the reserved ids the layout uses, and text tokens at ids from TEXT_BASE up.

    from fixtures_tokenizer import write_tokenizer
    path, code_to_id = write_tokenizer(tmp_path / "text_tokenizer.json", seed=0)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from shards import vocab

TEXT_BASE = 16388
CORPUS = [
    "What action should the robot take to pick up the black bowl and place it on the plate?",
    "Generate the next image based on the provided sequence of historical images and "
    "corresponding actions.",
    "put the cream cheese in the bowl, open the top drawer of the cabinet",
]


def image_name(code: int) -> str:
    """`IMGIMG` + one letter A..J per decimal digit of the codebook index + a trailing `Z`."""
    return "IMGIMG" + "".join("ABCDEFGHIJ"[int(c)] for c in str(code)) + "Z"


def reserved_names() -> dict[str, int]:
    """`<reservedNNNNN>` -> NNNNN + 4 for every reserved id from 8196 to the state block end."""
    return {f"<reserved{n:05d}>": vocab.reserved_id(n)
            for n in range(vocab.IMAGE_END - 4, vocab.STATE_END - 4 + 1)}


def train_text_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE vocabulary (contiguous ids from 0) and its merges."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=420, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    merges = [tuple(m) for m in json.loads(tok.to_str())["model"]["merges"]]
    return tok.get_vocab(with_added_tokens=False), merges


def write_tokenizer(path: str | Path, seed: int = 0) -> tuple[Path, np.ndarray]:
    """Write the tokenizer json; return (path, the expected codebook index -> id map)."""
    rng = np.random.default_rng(seed)
    ids = vocab.IMAGE_CODE_FIRST + rng.permutation(vocab.CODEBOOK_SIZE)   # code c -> ids[c]
    full = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    full.update({image_name(c): int(ids[c]) for c in range(vocab.CODEBOOK_SIZE)})
    full.update(reserved_names())
    text_vocab, merges = train_text_bpe()
    full.update({name: TEXT_BASE + i for name, i in text_vocab.items()})
    tok = Tokenizer(models.BPE(vocab=full, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path, ids.astype(np.int64)
