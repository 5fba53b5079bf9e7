"""The policy: a checkpoint + its processor card -> the next K actions in the robot's units.

    from trainer.policy import Policy
    policy = Policy.from_checkpoint("runs/demo/latest")          # VQ + tokenizer per the card
    actions = policy.act("pick up the bowl", state, front, wrist,  # raw arrays, as the robot gives
                         prev_front=pf, prev_wrist=pw, mode="continuous")   # (K, D) float64
    tokens = policy.prompt_tokens("pick up the bowl", state, front, wrist, pf, pw)  # parity tests

Preprocessing is the training pipeline's, read from the card (never re-specified here):
images are RGB uint8 (H, W, 3) exactly as the camera / simulator gives them; the card's
orientation ("rot180": `img[::-1, ::-1]`, as the LIBERO reader does) is applied, then
`shards.vq.preprocess` (PIL bicubic resize to the card's resolution, x/255*2-1) and
`shards.vq.encode`; the state (the model state vector, 8-d LIBERO: ee_pos ++ ee_ori axis-angle ++
gripper_states) is binned with the card's stats; the prompt is built with the same builders as the
shards (`shards.conversation`): BOS + "What action should the robot take to <instruction>?" +
state block + image blocks [prev_front, prev_wrist,] front, wrist + SEP.

Modes (SPEC.md 8):
- "continuous": prompt + ACTION_START, one forward pass, the action head -> K x D normalized,
  un-normalized with the card's action stats (relative-action recipes: the current state is added
  back on the relative dims).
- "discrete": greedy decoding under the action mask with a KV cache; the ACTION_START ..
  ACTION_END blocks are decoded to bin centres. By default decoding follows the response grammar
  (`response_grammar`: K blocks of ACTION_START, D bin tokens, ACTION_END, then SEP): every token
  the grammar does not allow at a position is masked, so the structural tokens are forced and each
  bin position takes the best of the card's bins; the result is always K x D.
  `constrained=False` is plain greedy decoding until SEP, as the published decoder does: a
  malformed generation (wrong block length, a non-bin token inside a block, fewer or more than K
  blocks, no SEP within the budget) raises `MalformedActions` carrying every problem found;
  nothing is patched.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shards import vocab
from shards.conversation import assemble, image_blocks, parse_action_blocks, vla_prompt_text
from shards.bins import unnormalize
from shards.tokenizer import load_tokenizer_from_record
from shards.fit import fit_vla, fit_wm
from shards.vq import encode, load_vq_from_record, normalize_pixels, preprocess, resolve_device
from trainer import checkpoint
from trainer.card import Card, MalformedActions, PolicyError, read_card, resolve_checkpoint
from trainer.engine import (Backend, Stepper, allowed_bins, attention_rule, bins_to_norm,
                            response_grammar)
from trainer.export import is_export, load_parts

MODES = ("continuous", "discrete")


# ---------------------------------------------------------------------------------------------
# Preprocessing (pure apart from the VQ encoder).
# ---------------------------------------------------------------------------------------------

def orient(image: np.ndarray, orientation: str) -> np.ndarray:
    """The training orientation of one raw (H, W, 3) frame."""
    return np.ascontiguousarray(image[::-1, ::-1]) if orientation == "rot180" else image


def check_image(image: Any, name: str, square: bool = True) -> np.ndarray:
    """An RGB uint8 frame; square unless the card's fitting takes any shape ("stretch",
    "published")."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
        raise PolicyError(f"{name}: expected an RGB uint8 (H, W, 3) image, got {arr.dtype} "
                          f"{arr.shape}")
    if square and arr.shape[0] != arr.shape[1]:
        raise PolicyError(f"{name}: expected a square image (the pipeline resizes square frames),"
                          f" got {arr.shape[0]}x{arr.shape[1]}")
    return arr


def frame_list(card: Card, front, wrist, prev_front=None, prev_wrist=None) -> list[np.ndarray]:
    """[prev_front, prev_wrist,] front, wrist, checked against the card's history."""
    prev = [prev_front, prev_wrist]
    if (prev_front is None) != (prev_wrist is None):
        raise PolicyError("give both prev_front and prev_wrist, or neither (first step)")
    if prev_front is not None and card.history < 2:
        raise PolicyError(f"this checkpoint was trained with history M={card.history}: it takes "
                          "no previous frames (drop prev_front / prev_wrist)")
    names = ["prev_front", "prev_wrist", "front", "wrist"]
    images = ([] if prev_front is None else prev) + [front, wrist]
    names = names[4 - len(images):]
    return [check_image(img, n, card.square_only) for img, n in zip(images, names)]


def check_state(card: Card, state: Any) -> np.ndarray:
    arr = np.asarray(state, dtype=np.float64).reshape(-1)
    if arr.shape != (card.state_dim,):
        raise PolicyError(f"state: expected {card.state_dim} values (the model state vector of "
                          f"recipe {card.recipe!r}), got shape {np.shape(state)}")
    if not np.isfinite(arr).all():
        raise PolicyError("state: contains NaN or inf")
    return arr


def frame_key(image: np.ndarray) -> bytes:
    """A content key of one frame (shape and bytes)."""
    arr = np.ascontiguousarray(image)
    return hashlib.blake2b(arr.tobytes(), digest_size=16,
                           person=str(arr.shape).encode()[:16]).digest()


def to_robot_units(card: Card, norm: np.ndarray, state: np.ndarray) -> np.ndarray:
    """Normalized (K, D) actions -> robot units; relative dims get the current state added."""
    out = unnormalize(norm, card.stats.action.min, card.stats.action.max)
    if card.relative_dims:
        dims = list(card.relative_dims)
        out[:, dims] += state[dims]
    return out


# ---------------------------------------------------------------------------------------------
# The processor: card + tokenizer + VQ encoder.
# ---------------------------------------------------------------------------------------------

CODE_CACHE = 8                       # frames whose codes a Processor keeps (4 per call at M=2)


@dataclass
class Processor:
    """Raw robot inputs -> the exact prompt tokens the shards hold for the same frames.

    The codes of the last `cache_frames` frames are kept, keyed by the frame's bytes: in a closed
    loop the history frames of a call were the current frames of an earlier one, and are not
    encoded again (0 turns the cache off: every call encodes every frame).
    """

    card: Card
    tokenizer: Any                   # shards.tokenizer.TextTokenizer
    vq: Any                          # shards.vq.VQHandle
    precision: str = "fp32"
    cache_frames: int = CODE_CACHE
    encoded: int = 0                 # frames run through the VQ encoder so far
    _codes: dict[bytes, np.ndarray] = field(default_factory=dict, repr=False)

    def image_codes(self, images: list[np.ndarray]) -> np.ndarray:
        """Raw frames -> codebook indices (n, h, w), oriented, resized and encoded as training;
        frames seen recently come from the cache, the others are encoded in one batch."""
        keys = [frame_key(img) for img in images]
        missing = list(dict.fromkeys(k for k in keys if k not in self._codes))
        if missing:
            fresh = self._encode([images[keys.index(k)] for k in missing])
            self._codes.update(zip(missing, fresh))
        out = np.stack([self._codes[k] for k in keys])
        for key in list(self._codes)[:max(0, len(self._codes) - self.cache_frames)]:
            del self._codes[key]                          # oldest first (insertion order)
        return out

    def clear_codes(self) -> None:
        """Forget every cached frame code (the counter `encoded` starts again at 0)."""
        self._codes.clear()
        self.encoded = 0

    def _encode(self, images: list[np.ndarray]) -> np.ndarray:
        frames = np.stack([orient(img, self.card.orientation) for img in images])
        self.encoded += len(images)
        if self.card.published_fit:                      # compat=published: the VLA fitting
            pixels = normalize_pixels(np.stack([fit_vla(f, self.card.resolution) for f in frames]))
        else:
            pixels = preprocess(frames, self.card.resolution)
        return encode(self.vq, pixels, precision=self.precision).numpy()

    def wm_image_codes(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Raw [front, wrist] -> codes per view as the world model was trained: the VLA codes, or
        (compat=published) the published world-model fitting, aspect kept, at crop offset key
        ("inference", view)."""
        if not self.card.published_fit:
            return list(self.image_codes(images))
        out = []
        for img, view in zip(images, ("front", "wrist")):
            fitted = fit_wm(orient(img, self.card.orientation), self.card.resolution,
                            ("inference", view))
            out.append(encode(self.vq, normalize_pixels(fitted[None]),
                              precision=self.precision).numpy()[0])
        return out

    def prompt_tokens(self, instruction: str, state, front, wrist, prev_front=None,
                      prev_wrist=None) -> np.ndarray:
        """BOS + human turn + SEP of a VLA query, int64 (the shard tokens before the response)."""
        images = frame_list(self.card, front, wrist, prev_front, prev_wrist)
        state = check_state(self.card, state)
        codes = self.image_codes(images)
        text = np.asarray(self.tokenizer.encode(vla_prompt_text(instruction)), np.int64)
        state_block = vocab.state_block(self.card.codec().state_bins(state))
        blocks = image_blocks(codes, self.tokenizer.image_code_to_id, self.card.resolution)
        tokens, _ = assemble([text, state_block, *blocks], [])
        return tokens[:-1]     # an empty response still gets its closing SEP: drop it

    def image_block(self, codes: np.ndarray) -> np.ndarray:
        return image_blocks(np.asarray(codes)[None], self.tokenizer.image_code_to_id,
                            self.card.resolution)[0]


# ---------------------------------------------------------------------------------------------
# The policy.
# ---------------------------------------------------------------------------------------------

class Policy:
    """Checkpoint + processor: raw robot inputs -> (K, D) actions in robot units."""

    def __init__(self, processor: Processor, backend: Backend) -> None:
        self.processor, self.backend = processor, backend
        self.card = processor.card
        self.last_generation: np.ndarray | None = None

    # -- loading

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, vq_path: str | Path | None = None,
                        tokenizer_path: str | Path | None = None,
                        device: str = "auto") -> "Policy":
        if is_export(path):
            if vq_path is not None or tokenizer_path is not None:
                raise PolicyError(f"{path} is an export: it carries its own VQ-GAN and "
                                  "tokenizer; drop vq_path / tokenizer_path")
            return cls.from_pretrained(path, device=device)
        step_dir = resolve_checkpoint(path)
        card = read_card(step_dir)
        dev = resolve_device(device)
        processor = Processor(card, load_tokenizer_from_record(card.tokenizer, tokenizer_path),
                              load_vq_from_record(card.vq, vq_path, device=dev))
        return cls(processor, Backend(load_model(step_dir, dev), dev))

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str = "auto") -> "Policy":
        """An `rynn-pipe export` directory (trainer/export.py): weights, VQ-GAN, tokenizer and
        card all come from it."""
        dev = resolve_device(device)
        card, tokenizer, vq, model = load_parts(path, dev)
        return cls(Processor(card, tokenizer, vq), Backend(model, dev))

    # -- prompts

    def prompt_tokens(self, instruction: str, state, front, wrist, prev_front=None,
                      prev_wrist=None) -> np.ndarray:
        """The exact VLA query tokens (BOS .. SEP) the shards hold for these raw inputs."""
        return self.processor.prompt_tokens(instruction, state, front, wrist, prev_front,
                                            prev_wrist)

    # -- acting

    def act(self, instruction: str, state, front, wrist, prev_front=None, prev_wrist=None,
            mode: str = "continuous", *, use_cache: bool = True,
            constrained: bool = True) -> np.ndarray:
        """The next K actions (K, D) in robot units (`constrained`: discrete decoding under the
        response grammar; False: plain greedy, MalformedActions when malformed)."""
        if mode not in MODES:
            raise PolicyError(f"mode must be one of {MODES}, got {mode!r}")
        state = check_state(self.card, state)
        prompt = self.prompt_tokens(instruction, state, front, wrist, prev_front, prev_wrist)
        norm = (self.continuous_norm(prompt) if mode == "continuous"
                else self.discrete_norm(prompt, use_cache=use_cache, constrained=constrained))
        return to_robot_units(self.card, norm, state)

    def continuous_norm(self, prompt: np.ndarray) -> np.ndarray:
        """Prompt (BOS .. SEP) + ACTION_START, one forward, the head: (K, D) normalized."""
        ids = [*np.asarray(prompt).tolist(), vocab.ACTION_START]
        rows = torch.from_numpy(attention_rule(np.asarray(ids)))
        hidden = self.backend.run(ids, 0, rows, None)
        out = self.backend.head(hidden[:, :-1]).float().cpu().numpy().astype(np.float64)
        if out.shape != (self.card.chunk, self.card.action_dim):
            raise PolicyError(f"action head returned {out.shape}, the card says "
                              f"K x D = {self.card.chunk} x {self.card.action_dim}")
        return out

    def generate_actions(self, prompt: np.ndarray, *, use_cache: bool = True,
                         max_new: int | None = None) -> tuple[np.ndarray, bool]:
        """Greedy response tokens after the prompt, until SEP (excluded); (tokens, ended)."""
        budget = max_new or self.card.chunk * (self.card.action_dim + 2) + 8
        stepper = Stepper(self.backend, prompt, use_cache=use_cache)
        for _ in range(budget):
            if stepper.greedy() == vocab.SEP:
                return np.asarray(stepper.ids[len(prompt):-1], np.int64), True
        return np.asarray(stepper.ids[len(prompt):], np.int64), False

    def generate_constrained(self, prompt: np.ndarray, *, use_cache: bool = True) -> np.ndarray:
        """Greedy response tokens under `response_grammar` (SEP excluded): structural tokens are
        the only ones allowed at their positions, so they are appended without a forward pass;
        each bin position takes the argmax over the card's bins."""
        template, is_bin = response_grammar(self.card.chunk, self.card.action_dim)
        stepper = Stepper(self.backend, prompt, use_cache=use_cache)
        allowed = allowed_bins(self.card.num_bins)
        for token, free in zip(template[:-1].tolist(), is_bin[:-1].tolist()):
            if free:
                stepper.greedy(allowed)
            else:
                stepper.append(token)
        return np.asarray(stepper.ids[len(prompt):], np.int64)

    def discrete_norm(self, prompt: np.ndarray, *, use_cache: bool = True,
                      constrained: bool = True) -> np.ndarray:
        """Action blocks -> bin centres (K, D) normalized. Constrained: always well formed;
        unconstrained: MalformedActions if malformed."""
        if constrained:
            tokens = self.generate_constrained(prompt, use_cache=use_cache)
            self.last_generation = tokens
            bins, _ = parse_action_blocks(tokens, self.card.chunk, self.card.action_dim)
            return bins_to_norm(bins, self.card.num_bins)
        tokens, ended = self.generate_actions(prompt, use_cache=use_cache)
        self.last_generation = tokens
        bins, problems = parse_action_blocks(tokens, self.card.chunk, self.card.action_dim)
        if not ended:
            problems.append(f"no SEP within {len(tokens)} generated tokens")
        if problems:
            raise MalformedActions(problems, tokens)
        return bins_to_norm(bins, self.card.num_bins)

    def teacher_forced_logits(self, tokens: np.ndarray, positions: np.ndarray) -> torch.Tensor:
        """Logits (n, V) at `positions` of one full forward over `tokens` under the rule."""
        ids = np.asarray(tokens, np.int64)
        hidden = self.backend.run(ids.tolist(), 0, torch.from_numpy(attention_rule(ids)), None)
        return self.backend.logits(hidden[0, torch.as_tensor(positions)]).float()



def load_model(step_dir: Path, device: torch.device) -> torch.nn.Module:
    """The trained network of a checkpoint directory, in eval mode on `device`."""
    model = checkpoint.load_model(step_dir)
    return model.to(device).eval()
