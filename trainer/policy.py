"""The policy: a checkpoint + its processor card -> the next K actions in the robot's units.

    from trainer.policy import Policy
    policy = Policy.from_checkpoint("runs/demo/latest")          # VQ + tokenizer per the card
    actions = policy.act("pick up the bowl", state, front, wrist,  # raw arrays, as the robot gives
                         prev_front=pf, prev_wrist=pw, mode="continuous")   # (K, D) float64
    tokens = policy.prompt_tokens("pick up the bowl", state, front, wrist, pf, pw)  # parity tests

Preprocessing is the training pipeline's, read from the card (never re-specified here):
images are RGB uint8 (H, W, 3) exactly as the camera / simulator gives them; the card's
orientation ("rot180": `img[::-1, ::-1]`, as the LIBERO reader does) is applied, then
`stages.vq.preprocess` (PIL bicubic resize to the card's resolution, x/255*2-1) and
`stages.vq.encode`; the state (the model state vector, 8-d LIBERO: ee_pos ++ ee_ori axis-angle ++
gripper_states) is binned with the card's stats; the prompt is built with the same builders as the
shards (`shards.conversation`): BOS + "What action should the robot take to <instruction>?" +
state block + image blocks [prev_front, prev_wrist,] front, wrist + SEP.

Modes (SPEC.md 8):
- "continuous": prompt + ACTION_START, one forward pass, the action head -> K x D normalized,
  un-normalized with the card's action stats (relative-action recipes: the current state is added
  back on the relative dims).
- "discrete": greedy decoding under the action mask with a KV cache until SEP; the ACTION_START ..
  ACTION_END blocks are parsed and decoded to bin centres. A malformed generation (wrong block
  length, a non-bin token inside a block, fewer or more than K blocks, no SEP within the budget)
  raises `MalformedActions` carrying every problem found; nothing is patched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import RynnError
from shards import vocab
from shards.conversation import Codec, assemble, image_blocks, vla_prompt_text
from stages.bins import Stats, from_bins, unnormalize
from trainer.mask import may_attend

MODES = ("continuous", "discrete")
ORIENTATIONS = ("rot180", "none")
RANDOM_VQ_SOURCE = re.compile(r"random-(\w+)-seed(\d+)")


class PolicyError(RynnError):
    """Inputs that do not match the checkpoint's processor card, or an unusable checkpoint."""


class MalformedActions(PolicyError):
    """Discrete decoding produced action blocks that cannot be parsed; `problems` lists why."""

    def __init__(self, problems: list[str], tokens: np.ndarray) -> None:
        super().__init__("malformed generated action blocks: " + "; ".join(problems))
        self.problems, self.tokens = problems, tokens


# ---------------------------------------------------------------------------------------------
# The processor card (what preprocessing needs).
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Card:
    """The preprocessing facts of a checkpoint, read from its `processor.json`."""

    resolution: int
    orientation: str
    chunk: int                       # K
    action_dim: int                  # D
    state_dim: int
    history: int                     # M
    stats: Stats
    tokenizer: dict[str, Any]        # {"kind", "digest", "path"}
    vq: dict[str, Any]               # {"digest", "untrained", "source", "arch"}
    recipe: str = ""
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def relative_dims(self) -> tuple[int, ...]:
        return tuple(self.stats.relative_action_dims)

    @property
    def num_bins(self) -> int:
        return self.stats.num_bins

    def codec(self) -> Codec:
        return Codec.from_stats(self.stats, self.num_bins, self.relative_dims)

    def __post_init__(self) -> None:
        if self.orientation not in ORIENTATIONS:
            raise PolicyError(f"processor card: orientation {self.orientation!r} is not one of "
                              f"{ORIENTATIONS}")
        if self.stats.action.dim != self.action_dim or self.stats.state.dim != self.state_dim:
            raise PolicyError(f"processor card: stats dims (state {self.stats.state.dim}, action "
                              f"{self.stats.action.dim}) differ from the card's state_dim "
                              f"{self.state_dim} / action_dim {self.action_dim}")


# ---------------------------------------------------------------------------------------------
# Preprocessing (pure apart from the VQ encoder).
# ---------------------------------------------------------------------------------------------

def orient(image: np.ndarray, orientation: str) -> np.ndarray:
    """The training orientation of one raw (H, W, 3) frame."""
    return np.ascontiguousarray(image[::-1, ::-1]) if orientation == "rot180" else image


def check_image(image: Any, name: str) -> np.ndarray:
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
        raise PolicyError(f"{name}: expected an RGB uint8 (H, W, 3) image, got {arr.dtype} "
                          f"{arr.shape}")
    if arr.shape[0] != arr.shape[1]:
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
    return [check_image(img, n) for img, n in zip(images, names)]


def check_state(card: Card, state: Any) -> np.ndarray:
    arr = np.asarray(state, dtype=np.float64).reshape(-1)
    if arr.shape != (card.state_dim,):
        raise PolicyError(f"state: expected {card.state_dim} values (the model state vector of "
                          f"recipe {card.recipe!r}), got shape {np.shape(state)}")
    if not np.isfinite(arr).all():
        raise PolicyError("state: contains NaN or inf")
    return arr


def to_robot_units(card: Card, norm: np.ndarray, state: np.ndarray) -> np.ndarray:
    """Normalized (K, D) actions -> robot units; relative dims get the current state added."""
    out = unnormalize(norm, card.stats.action.min, card.stats.action.max)
    if card.relative_dims:
        dims = list(card.relative_dims)
        out[:, dims] += state[dims]
    return out


# ---------------------------------------------------------------------------------------------
# Parsing generated action blocks.
# ---------------------------------------------------------------------------------------------

def parse_action_blocks(tokens: np.ndarray, k: int, d: int) -> tuple[np.ndarray, list[str]]:
    """Generated response tokens (up to and excluding SEP) -> (bins (n, d), problems).

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


def bins_to_norm(bins: np.ndarray, num_bins: int) -> np.ndarray:
    """Bin ids (1..num_bins) -> normalized bin centres."""
    return from_bins(bins, num_bins)


# ---------------------------------------------------------------------------------------------
# The processor: card + tokenizer + VQ encoder.
# ---------------------------------------------------------------------------------------------

@dataclass
class Processor:
    """Raw robot inputs -> the exact prompt tokens the shards hold for the same frames."""

    card: Card
    tokenizer: Any                   # shards.tokenizer.TextTokenizer
    vq: Any                          # stages.vq.VQHandle
    precision: str = "fp32"

    def image_codes(self, images: list[np.ndarray]) -> np.ndarray:
        """Raw frames -> codebook indices (n, h, w), oriented, resized and encoded as training."""
        from stages.vq import encode, preprocess
        frames = np.stack([orient(img, self.card.orientation) for img in images])
        return encode(self.vq, preprocess(frames, self.card.resolution),
                      precision=self.precision).numpy()

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
# The attention rule at inference (SPEC.md 7) and incremental decoding with or without a cache.
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# The model behind the policy.
# ---------------------------------------------------------------------------------------------

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
        from transformers.cache_utils import DynamicCache
        return DynamicCache(config=self.backbone.config)

    @property
    def backbone(self) -> torch.nn.Module:
        return self.model.backbone

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


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
        from stages.vq import resolve_device
        from trainer.export import is_export
        if is_export(path):
            if vq_path is not None or tokenizer_path is not None:
                raise PolicyError(f"{path} is an export: it carries its own VQ-GAN and "
                                  "tokenizer; drop vq_path / tokenizer_path")
            return cls.from_pretrained(path, device=device)
        step_dir = resolve_checkpoint(path)
        card = read_card(step_dir)
        dev = resolve_device(device)
        processor = Processor(card, load_tokenizer_for(card, tokenizer_path),
                              load_vq_for(card, vq_path, dev))
        return cls(processor, Backend(load_model(step_dir, dev), dev))

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str = "auto") -> "Policy":
        """An `rynn-pipe export` directory (trainer/export.py): weights, VQ-GAN, tokenizer and
        card all come from it."""
        from stages.vq import resolve_device
        from trainer.export import load_parts
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
            mode: str = "continuous", *, use_cache: bool = True) -> np.ndarray:
        """The next K actions (K, D) in robot units."""
        if mode not in MODES:
            raise PolicyError(f"mode must be one of {MODES}, got {mode!r}")
        state = check_state(self.card, state)
        prompt = self.prompt_tokens(instruction, state, front, wrist, prev_front, prev_wrist)
        norm = (self.continuous_norm(prompt) if mode == "continuous"
                else self.discrete_norm(prompt, use_cache=use_cache))
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

    def discrete_norm(self, prompt: np.ndarray, *, use_cache: bool = True) -> np.ndarray:
        """Greedy action blocks -> bin centres (K, D) normalized; MalformedActions if malformed."""
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


# ---------------------------------------------------------------------------------------------
# Tokenizer and VQ-GAN, checked against the card.
# ---------------------------------------------------------------------------------------------

def load_tokenizer_for(card: Card, path: str | Path | None):
    """The text tokenizer the card names: `path`, the recorded path, or the fallback."""
    from shards.tokenizer import fallback_tokenizer, load_text_tokenizer
    want = card.tokenizer.get("digest")
    if path is None and card.tokenizer.get("kind") == "fallback":
        tok = fallback_tokenizer(warn=False)
    elif path is None and card.tokenizer.get("path") and Path(card.tokenizer["path"]).is_file():
        tok = load_text_tokenizer(card.tokenizer["path"])
    elif path is None:
        raise PolicyError(f"this checkpoint was trained with the Chameleon tokenizer "
                          f"(sha256 {want}); pass tokenizer_path / --tokenizer-path")
    else:
        tok = load_text_tokenizer(path)
    if tok.digest != want:
        raise PolicyError(f"tokenizer {path or card.tokenizer.get('path') or tok.kind} has digest "
                          f"{tok.digest}, but the checkpoint was trained with {want}: its text "
                          "and image ids would mean other tokens; pass the tokenizer used to "
                          "build the training shards")
    return tok


def load_vq_for(card: Card, path: str | Path | None, device: torch.device):
    """The VQ-GAN the card names (a path, or the seeded random init it records); digest-checked."""
    from stages.vq import load_vq
    want, source = card.vq.get("digest"), str(card.vq.get("source") or "")
    match = RANDOM_VQ_SOURCE.fullmatch(source)
    if path is None and not match:
        raise PolicyError(f"this checkpoint's image tokens come from VQ-GAN {source!r} (digest "
                          f"{want}); pass vq_path / --vq-path")
    handle = (load_vq(path, device=device) if path is not None else
              load_vq(None, random_arch=match.group(1), seed=int(match.group(2)), device=device))
    if handle.digest != want:
        raise PolicyError(f"VQ-GAN {path or source} has digest {handle.digest}, but the "
                          f"checkpoint's shards were tokenized with {want}: its image tokens "
                          "would differ; pass the VQ-GAN used by the pretokenize stage")
    return handle


# ---------------------------------------------------------------------------------------------
# Checkpoint directory and processor card.
# ---------------------------------------------------------------------------------------------

CARD_FILE = "processor.json"
LATEST = "latest"


def resolve_checkpoint(path: str | Path) -> Path:
    """A `step-NNNNNN/` directory, or a run directory / `latest` pointer leading to one."""
    path = Path(path)
    if path.is_file() and path.name == LATEST:
        path = path.parent / path.read_text().strip()
    elif path.is_dir() and not (path / CARD_FILE).exists() and (path / LATEST).exists():
        return resolve_checkpoint(path / LATEST)
    if not (path / CARD_FILE).is_file():
        raise PolicyError(f"{path}: no {CARD_FILE}: not a checkpoint directory (expected a "
                          f"run's step-NNNNNN/ directory, the run directory, or its '{LATEST}')")
    return path.resolve()


def read_card(step_dir: Path) -> Card:
    """Parse `processor.json` into a Card (missing fields are named in the error)."""
    from pipeline.io import read_json
    return parse_card(read_json(step_dir / CARD_FILE), where=str(step_dir / CARD_FILE))


def parse_card(doc: dict[str, Any], where: str) -> Card:
    """A processor card document (as in `processor.json`) -> Card."""
    try:
        stats = Stats.from_dict(doc["stats"], where=where)
        return Card(resolution=int(doc["resolution"]), orientation=str(doc["orientation"]),
                    chunk=int(doc["K"]), action_dim=int(doc["D"]),
                    state_dim=int(doc.get("state_dim", stats.state.dim)),
                    history=int(doc["M"]), stats=stats, tokenizer=dict(doc["tokenizer"]),
                    vq=dict(doc["vq"]), recipe=str(doc.get("recipe", "")), raw=doc)
    except KeyError as exc:
        raise PolicyError(f"{where}: missing field {exc}") from exc


def load_model(step_dir: Path, device: torch.device) -> torch.nn.Module:
    """The trained network of a checkpoint directory, in eval mode on `device`."""
    from trainer import checkpoint
    model = checkpoint.load_model(step_dir)
    return model.to(device).eval()
