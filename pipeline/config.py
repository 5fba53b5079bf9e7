"""Run configuration: frozen keyword-only dataclasses, one per stage, and one recipe per suite.

A recipe is a function returning a `RunConfig`; every suite derives from `base()` with `replace`.
`apply_overrides(cfg, ["conv.chunk=5", "bins.num_bins=128"])` is what `--set key=value` does.

    from pipeline.config import recipe, apply_overrides
    cfg = apply_overrides(recipe("libero_long"), ["image.batch_size=16"])
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal, get_args, get_origin, get_type_hints


class ConfigError(ValueError):
    """A config value is invalid; the message names the option and the fix."""


def _check(cond: bool, option: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{option}: {msg}")


@dataclass(frozen=True, kw_only=True)
class SourceConfig:
    """How raw demonstrations are read (LIBERO HDF5 or LeRobot)."""

    format: Literal["auto", "libero", "lerobot"] = "auto"
    # LIBERO: where the language instruction comes from. "auto": the `problem_info` attribute when
    # the file has one (raw release), else the file name (regenerated no-op files). SPEC.md 9.2.
    instruction_source: Literal["auto", "attribute", "filename"] = "auto"
    # LIBERO flavour: "auto" detects raw release vs regenerated no-op files (SPEC.md 1.1).
    flavour: Literal["auto", "raw", "regenerated"] = "auto"
    # Rotate both cameras 180 degrees (img[::-1, ::-1]) as the published pipeline does.
    rotate_180: bool = True
    front_camera: str = "agentview_rgb"
    wrist_camera: str = "eye_in_hand_rgb"
    # LeRobot feature mapping (SO100 defaults, SPEC.md 1.2).
    lerobot_front_key: str = "observation.images.front"
    lerobot_wrist_key: str = "observation.images.wrist"
    lerobot_state_key: str = "observation.state"
    lerobot_action_key: str = "action"
    # LeRobot: a row's timestamp must be frame_index / fps within this many seconds (as LeRobot's
    # own `tolerance_s`); a row further off is an error, never matched to a neighbouring frame.
    lerobot_tolerance_s: float = 1e-4
    # Frames that are not square (SO100 cameras: 640 x 480). "refuse": one error naming the file
    # (the default: nothing is stretched silently). "stretch": resized to the square resolution,
    # aspect not kept, as the published VLA processor does (its first step is a 256 x 256 resize);
    # the manifest and the checkpoint card then record images.fit = "stretch" and `act` applies
    # the same resize. compat=published fits any shape its own way (shards/fit.py).
    non_square: Literal["refuse", "stretch"] = "refuse"

    def __post_init__(self) -> None:
        _check(self.front_camera != self.wrist_camera, "source.front_camera",
               "front and wrist cameras must differ")
        _check(self.lerobot_tolerance_s >= 0, "source.lerobot_tolerance_s", "must be >= 0")


@dataclass(frozen=True, kw_only=True)
class FilterConfig:
    """No-op filter (SPEC.md 2)."""

    enabled: bool = True
    noop_threshold: float = 1e-4
    # Fail when more than this fraction of all steps would be dropped.
    max_drop_fraction: float = 0.5

    def __post_init__(self) -> None:
        _check(self.noop_threshold >= 0, "filter.noop_threshold", "must be >= 0")
        _check(0 <= self.max_drop_fraction <= 1, "filter.max_drop_fraction", "must be in [0, 1]")


@dataclass(frozen=True, kw_only=True)
class SplitConfig:
    """Deterministic 90/10 split by task (last tasks held out) and by trajectory within a task."""

    val_task_fraction: float = 0.1
    val_episode_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("val_task_fraction", "val_episode_fraction"):
            _check(0 <= getattr(self, name) < 1, f"split.{name}", "must be in [0, 1)")


@dataclass(frozen=True, kw_only=True)
class BinsConfig:
    """Per-dimension min/max stats and the 256-bin codec (SPEC.md 3)."""

    num_bins: int = 256
    # None: fit stats from the data. "libero_published": the published LIBERO constants (parity).
    preset: str | None = None
    # Which episodes the stats are fitted on: the training split, or every episode.
    fit_on: Literal["train", "all"] = "train"

    def __post_init__(self) -> None:
        _check(2 <= self.num_bins <= 256, "bins.num_bins",
               "must be in [2, 256] (the vocabulary has 256 bin ids per block)")


@dataclass(frozen=True, kw_only=True)
class ImageConfig:
    """VQ-GAN pretokenization (SPEC.md 5)."""

    resolution: int = 256
    # Local path to `vqgan.yaml`+`vqgan.ckpt` (a directory or the .ckpt) or an HF Chameleon dir.
    # None: a seeded random-initialised VQ-GAN (untrained tokens; said loudly).
    vq_path: str | None = None
    # Architecture of the random-init VQ-GAN when vq_path is None: "full" or "small" (CPU demo).
    vq_random_arch: Literal["full", "small"] = "full"
    vq_seed: int = 0
    # Encoder batch size; None: measured once per device, resolution and architecture and
    # remembered under $RYNN_HOME (stages/vq_batch.py). Never changes the codes.
    batch_size: int | None = None
    precision: Literal["fp32", "bf16-mixed"] = "fp32"
    device: str = "auto"
    workers: int = 1
    # compat=published: seed of the world-model crop offset, the one random step of the published
    # image fitting (here a hash of seed, episode, frame row and view: reproducible).
    crop_seed: int = 0

    def __post_init__(self) -> None:
        _check(self.resolution % 32 == 0 and self.resolution > 0, "image.resolution",
               "must be a positive multiple of 32 (256 or 512 in the paper)")
        _check(self.batch_size is None or self.batch_size >= 1, "image.batch_size",
               "must be >= 1, or none to measure the fastest")
        _check(self.workers >= 1, "image.workers", "must be >= 1")
        _check(DEVICE.fullmatch(self.device) is not None, "image.device",
               f"got {self.device!r}; use auto, cpu, cuda or cuda:N")


DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


@dataclass(frozen=True, kw_only=True)
class ConvConfig:
    """VLA and world-model conversations (SPEC.md 6)."""

    history: int = 2
    chunk: int = 10
    max_seq_len: int = 4096
    # What to do with a sample longer than max_seq_len: fail, or drop it and count the drop.
    too_long: Literal["error", "drop"] = "error"
    vla: bool = True
    world_model: bool = True
    # Path to a Chameleon `text_tokenizer.json`; None uses the built-in fallback (warned about).
    tokenizer_path: str | None = None
    # Action dims made relative to the current state (LeRobot recipe), e.g. (0, 1, 2, 3, 4).
    relative_action_dims: tuple[int, ...] = ()
    # Drop VLA samples whose whole action chunk is static (LeRobot recipe), counted.
    drop_static_chunks: bool = False
    static_threshold: float = 1e-3

    def __post_init__(self) -> None:
        _check(self.history >= 1, "conv.history", "must be >= 1")
        _check(self.chunk >= 1, "conv.chunk", "must be >= 1")
        _check(self.max_seq_len >= 64, "conv.max_seq_len", "must be >= 64")
        _check(self.vla or self.world_model, "conv.vla", "enable at least one query type")


@dataclass(frozen=True, kw_only=True)
class ShardConfig:
    """Webdataset shard packing."""

    max_shard_bytes: int = 64 * 2**20  # the reader holds a few whole shards in memory
    max_shard_samples: int = 100_000
    compression: Literal["gz", "none"] = "gz"

    def __post_init__(self) -> None:
        _check(self.max_shard_bytes >= 2**16, "shard.max_shard_bytes", "must be >= 65536")
        _check(self.max_shard_samples >= 1, "shard.max_shard_samples", "must be >= 1")


COMPAT = ("none", "published")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Everything the data pipeline reads. Each stage declares which fields it depends on."""

    recipe: str = "base"
    # "published": shards equal to what the published scripts make from the same frames and codes
    # (prompt from the file name, the published split rule, image fitting, SO100 world-model
    # samples, static rule, float32 relative actions, no LeRobot no-op filter). README,
    # "Deliberate differences", lists each difference this switch restores.
    compat: Literal["none", "published"] = "none"
    suite: str = ""  # sub-directory of the data root holding the suite's files ("" = the root)
    source: SourceConfig = field(default_factory=SourceConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    bins: BinsConfig = field(default_factory=BinsConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    conv: ConvConfig = field(default_factory=ConvConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)


# ---------------------------------------------------------------------------------------------
# Recipes: one per suite, all derived from base().
# ---------------------------------------------------------------------------------------------

def base() -> RunConfig:
    return RunConfig()


def _libero(suite: str, chunk: int) -> RunConfig:
    cfg = base()
    return replace(cfg, recipe=suite, suite=suite, conv=replace(cfg.conv, history=2, chunk=chunk))


def libero_spatial() -> RunConfig:
    return _libero("libero_spatial", chunk=10)


def libero_object() -> RunConfig:
    return _libero("libero_object", chunk=5)


def libero_goal() -> RunConfig:
    return _libero("libero_goal", chunk=5)


def libero_10() -> RunConfig:
    return _libero("libero_10", chunk=10)


def libero_90() -> RunConfig:
    return _libero("libero_90", chunk=10)


def demo() -> RunConfig:
    """The embedded demo suite, sized for a CPU: 128 px images (4x4 grid units, 76 tokens per
    image instead of 276) and a reduced-width random VQ-GAN. Real suites use 256 px."""
    cfg = _libero("demo", chunk=5)
    image = replace(cfg.image, resolution=128, vq_random_arch="small")
    return replace(cfg, suite="", image=image)


def sim_lift() -> RunConfig:
    """robosuite Lift demos from `rynn-pipe sim-data` (LIBERO raw layout), sized for an hour of
    training on 2 CPU cores: 64 px (24 tokens per image: a VLA sample is ~207 tokens instead of
    ~417 at 128 px, so twice the steps fit in the hour; the wrist camera still shows the cube large
    when the gripper nears it), the reduced random VQ-GAN, history 2, chunk 5 (expert episodes are
    ~40 steps). The env renders at 128 px; the policy resizes frames exactly as tokenizing does."""
    cfg = demo()
    return replace(cfg, recipe="sim_lift", image=replace(cfg.image, resolution=64))


def so100() -> RunConfig:
    """LeRobot SO100 (SPEC.md 1.2): history 1, chunk 20, arm actions relative to the state."""
    cfg = base()
    conv = replace(cfg.conv, history=1, chunk=20, relative_action_dims=(0, 1, 2, 3, 4),
                   drop_static_chunks=True)
    # LeRobot videos are stored upright: no 180-degree rotation (a LIBERO convention).
    # SO100 cameras are 640 x 480: stretched to square, as the published VLA processor does.
    source = replace(cfg.source, format="lerobot", rotate_180=False, non_square="stretch")
    return replace(cfg, recipe="so100", source=source, conv=conv)


RECIPES = {
    "base": base,
    "libero_spatial": libero_spatial,
    "libero_object": libero_object,
    "libero_goal": libero_goal,
    "libero_10": libero_10,
    "libero_90": libero_90,
    "demo": demo,
    "sim_lift": sim_lift,
    "so100": so100,
}
ALIASES = {"libero_long": "libero_10"}


def recipe(name: str) -> RunConfig:
    key = ALIASES.get(name, name)
    if key not in RECIPES:
        known = ", ".join(sorted([*RECIPES, *ALIASES]))
        raise ConfigError(f"recipe: unknown recipe {name!r}; choose one of: {known}")
    cfg = RECIPES[key]()
    return replace(cfg, recipe=name) if name in ALIASES else cfg


# ---------------------------------------------------------------------------------------------
# Overrides, flattening and hashing.
# ---------------------------------------------------------------------------------------------

def _parse_value(raw: str, typ: Any, option: str) -> Any:
    origin = get_origin(typ)
    if origin is Literal:
        choices = get_args(typ)
        _check(raw in choices, option, f"got {raw!r}; choose one of {list(choices)}")
        return raw
    if origin is tuple:
        try:
            return tuple(int(x) for x in raw.split(",") if x.strip()) if raw.strip() else ()
        except ValueError:
            raise ConfigError(f"{option}: cannot read {raw!r} as comma-separated integers, "
                              "e.g. 0,1,2") from None
    args = [a for a in get_args(typ) if a is not type(None)]
    if args and type(None) in get_args(typ):  # Optional[X]
        if raw.lower() in ("none", "null", ""):
            return None
        return _parse_value(raw, args[0], option)
    if typ is bool:
        _check(raw.lower() in ("1", "0", "true", "false", "yes", "no"), option,
               f"got {raw!r}; use true or false")
        return raw.lower() in ("1", "true", "yes")
    try:
        return typ(raw)
    except ValueError as exc:
        raise ConfigError(f"{option}: cannot read {raw!r} as {typ.__name__}") from exc


def set_field(cfg: Any, dotted: str, raw: str) -> Any:
    """Return a copy of `cfg` with the dotted field set from its string form."""
    head, _, rest = dotted.partition(".")
    hints = get_type_hints(type(cfg))
    names = {f.name for f in fields(cfg)}
    if head not in names:
        raise ConfigError(f"{dotted}: unknown option; known here: {', '.join(sorted(names))}")
    if rest:
        child = getattr(cfg, head)
        _check(dataclasses.is_dataclass(child), dotted, f"{head} has no sub-options")
        return replace(cfg, **{head: set_field(child, rest, raw)})
    _check(not dataclasses.is_dataclass(getattr(cfg, head)), dotted,
           "is a group; set one of its fields, e.g. " + f"{head}.<field>=value")
    return replace(cfg, **{head: _parse_value(raw, hints[head], dotted)})


def apply_overrides(cfg: RunConfig, overrides: list[str] | tuple[str, ...]) -> RunConfig:
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. conv.chunk=5")
        try:
            cfg = set_field(cfg, key.strip(), value.strip())
        except ConfigError as exc:          # name the option in full, as the user typed it
            leaf, msg = key.strip().rsplit(".", 1)[-1], str(exc)
            if msg.startswith(f"{leaf}:") and leaf != key.strip():
                raise ConfigError(f"{key.strip()}{msg[len(leaf):]}") from None
            raise
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """{"conv.chunk": 10, ...} for every leaf field."""
    out: dict[str, Any] = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out.update(flatten(value, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = list(value) if isinstance(value, tuple) else value
    return out


# Fields added after outputs were published: left out of stage keys and manifests while they hold
# this value, so outputs made before they existed keep their keys and bytes.
OMITTED_AT = {"compat": "none", "image.crop_seed": 0}


def select(cfg: RunConfig, patterns: tuple[str, ...]) -> dict[str, Any]:
    """The config fields a stage reads: exact names or group prefixes ("conv.*")."""
    if isinstance(cfg, ConfigView):
        return cfg.select(patterns)
    flat = {k: v for k, v in flatten(cfg).items()
            if k not in OMITTED_AT or v != OMITTED_AT[k]}
    out = {}
    for pat in patterns:
        hits = {k: v for k, v in flat.items() if declared(k, (pat,))}
        if not hits and pat not in OMITTED_AT:
            raise ConfigError(f"stage field {pat!r} matches no config option")
        out.update(hits)
    return dict(sorted(out.items()))


class UndeclaredField(ConfigError):
    """A stage read a config field it did not declare (its cache key would miss that field)."""


def declared(path: str, patterns: tuple[str, ...]) -> bool:
    """Whether dotted `path` is named by `patterns` (exact names or group prefixes "conv.*")."""
    return any(path == p or (p.endswith(".*") and path.startswith(p[:-1])) for p in patterns)


class ConfigView:
    """A read-only view of a config that lets its reader see only the fields it declared.

    The runner hands each stage `ConfigView(cfg, stage.fields + stage.untracked, stage.name)`:
    reading any other leaf field raises `UndeclaredField` naming the stage and the field, so an
    undeclared read can never give a stale cache hit. Nested configs come back as views too.
    `replace(...)` returns a view of a modified copy (for execution-only fields such as a device).
    """

    __slots__ = ("_cfg", "_allowed", "_owner", "_prefix")

    def __init__(self, cfg: Any, allowed: tuple[str, ...], owner: str, prefix: str = "") -> None:
        for name, value in (("_cfg", cfg), ("_allowed", tuple(allowed)), ("_owner", owner),
                            ("_prefix", prefix)):
            object.__setattr__(self, name, value)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._cfg, name)
        path = self._prefix + name
        if dataclasses.is_dataclass(value):
            return ConfigView(value, self._allowed, self._owner, f"{path}.")
        self._check(path)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        raise dataclasses.FrozenInstanceError(f"config is read-only (tried to set {name!r})")

    def __getstate__(self) -> tuple:
        return self._cfg, self._allowed, self._owner, self._prefix

    def __setstate__(self, state: tuple) -> None:
        self.__init__(*state)

    def __repr__(self) -> str:
        return f"ConfigView({self._owner!r}, {self._prefix or 'root'})"

    def select(self, patterns: tuple[str, ...]) -> dict[str, Any]:
        """`select` over the viewed config; every selected field must be declared."""
        out = select(self._cfg, patterns)
        for path in out:
            self._check(self._prefix + path)
        return out

    def _check(self, path: str) -> None:
        if not declared(path, self._allowed):
            raise UndeclaredField(f"stage {self._owner!r} read config field {path!r} without "
                                  f"declaring it: add {path!r} to the stage's fields (they make "
                                  f"its cache key)")

    def replace(self, **changes: Any) -> "ConfigView":
        """A view of a copy with `changes` (values may be views of sub-configs)."""
        plain = {k: v._cfg if isinstance(v, ConfigView) else v for k, v in changes.items()}
        return ConfigView(replace(self._cfg, **plain), self._allowed, self._owner, self._prefix)


def digest(obj: Any) -> str:
    """sha256 of the canonical JSON form of obj."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()
