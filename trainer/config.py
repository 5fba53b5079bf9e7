"""Trainer configs: a frozen ModelConfig per preset, a TrainConfig and the LossConfig built from
it, validated at construction.

    from trainer.config import resolve_train_config
    cfg = resolve_train_config("tiny", ["lr=3e-4", "batch_size=8"], steps=300)
    cfg.loss                   # LossConfig(mode="paper", alpha_l1=10.0, l1_target="raw")
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

from pipeline.config import ConfigError, _check, apply_overrides


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Backbone (Chameleon) and action-head shapes."""

    name: str = "tiny"
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 4
    intermediate: int = 688
    max_positions: int = 4096
    head_width: int = 256          # action head width (1024 in the paper)
    head_heads: int = 4
    head_layers: int = 2
    head_ffn: int = 1024           # 4096 in the paper
    head_dropout: float = 0.1
    residual_dropout: float = 0.0  # attention dropout of the backbone (0.05-0.1 published)
    gradient_checkpointing: bool = False
    # Initial input embeddings of the 256 state-bin and 256 action-bin tokens when training from
    # scratch: "random" (Chameleon's N(0, 0.02) rows: bin 17 is as far from bin 18 as from bin
    # 200) or "ordinal" (smooth Fourier features of the bin index at the same scale, so nearby
    # bins start nearby; trainer.model.ordinal_rows). `--init` replaces both with the checkpoint.
    bin_init: Literal["random", "ordinal"] = "random"
    # Chameleon architecture facts that change no weight shape (`--init` adopts a checkpoint's)
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    swin_norm: bool = False
    hidden_act: str = "silu"

    def __post_init__(self) -> None:
        _check(self.hidden % self.heads == 0, "model.hidden", "must be divisible by model.heads")
        _check(self.heads % self.kv_heads == 0, "model.kv_heads", "must divide model.heads")
        _check(self.head_width % self.head_heads == 0, "model.head_width",
               "must be divisible by model.head_heads")
        _check(self.bin_init in ("random", "ordinal"), "model.bin_init",
               "must be 'random' or 'ordinal'")


@dataclass(frozen=True, kw_only=True)
class LossConfig:
    """What trainer.loss.Loss computes: the paper's CE terms or the published weighted CE +
    z-loss, plus alpha_l1 x L1 of the head against the raw or the bin-quantized actions."""

    mode: Literal["paper", "published"] = "paper"
    alpha_l1: float = 10.0
    l1_target: Literal["raw", "quantized"] = "raw"

    def __post_init__(self) -> None:
        _check(self.mode in ("paper", "published"), "loss_mode", "must be paper or published")
        _check(self.l1_target in ("raw", "quantized"), "l1_target", "must be raw or quantized")
        _check(math.isfinite(self.alpha_l1) and self.alpha_l1 >= 0, "alpha_l1",
               "must be finite and >= 0")


PRESETS = {
    # a few seconds per hundred steps: unit tests
    "test": ModelConfig(name="test", hidden=64, layers=2, heads=2, kv_heads=2, intermediate=128,
                        head_width=64, head_ffn=128),
    # trains on a CPU in minutes
    "tiny": ModelConfig(),
    # between the two: a GPU smoke test
    "small": ModelConfig(name="small", hidden=1024, layers=8, heads=16, kv_heads=16,
                         intermediate=2816, head_width=512, head_ffn=2048),
    # Chameleon-7B, the paper's shape
    "7b": ModelConfig(name="7b", hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008,
                      head_width=1024, head_ffn=4096, residual_dropout=0.05,
                      gradient_checkpointing=True),
}


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    steps: int = 300
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    schedule: Literal["constant", "cosine"] = "constant"   # published: constant after warm-up
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 4.0
    # AdamW's implementation: "auto" is torch's default (a per-tensor loop on CPU); "fused" is
    # torch's single-kernel AdamW, the same update up to float rounding (which Adam amplifies for
    # gradients near eps); a tiny-preset training step (batch 4, one CPU thread) ran 1.38x
    # faster (`python -m bench train` prints the comparison). "foreach" batches tensors per op.
    adamw: Literal["auto", "fused", "foreach"] = "auto"
    alpha_l1: float = 10.0
    loss_mode: Literal["paper", "published"] = "paper"
    l1_target: Literal["raw", "quantized"] = "raw"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    mix: float | None = None                 # fraction of VLA samples; None = natural ratio
    # "auto": the shard set's training split: "all" (train + val_ind + val_ood) when it was
    # made with compat=published, as the published joint training; else "train".
    train_split: Literal["auto", "train", "all"] = "auto"
    eval_every: int = 100
    eval_batches: int = 4
    save_every: int = 100
    keep_last: int = 2
    log_every: int = 10
    seed: int = 0
    distributed: Literal["auto", "ddp", "fsdp"] = "auto"

    def __post_init__(self) -> None:
        _check(self.steps >= 1, "steps", "must be >= 1")
        _check(self.batch_size >= 1, "batch_size", "must be >= 1")
        _check(self.grad_accum >= 1, "grad_accum", "must be >= 1")
        _check(math.isfinite(self.lr) and self.lr > 0, "lr", "must be finite and > 0")
        for name in ("eval_every", "save_every", "log_every", "eval_batches"):
            _check(getattr(self, name) >= 1, name, "must be >= 1")
        _check(self.grad_clip > 0, "grad_clip", "must be > 0")
        _check(self.keep_last >= 1, "keep_last", "must be >= 1 (the latest checkpoint is kept)")
        _check(self.mix is None or 0 <= self.mix <= 1, "mix", "must be in [0, 1] or none")
        self.loss                            # the loss fields, validated by LossConfig

    @property
    def loss(self) -> LossConfig:
        return LossConfig(mode=self.loss_mode, alpha_l1=self.alpha_l1, l1_target=self.l1_target)


LRS = {"test": 1e-3, "tiny": 1e-3, "small": 3e-4, "7b": 5e-6}


def preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise ConfigError(f"--preset {name!r}: unknown; choose one of {', '.join(PRESETS)}")
    return TrainConfig(model=PRESETS[name], lr=LRS[name])


def resolve_train_config(name: str, overrides: list[str] | tuple[str, ...] = (),
                         steps: int | None = None) -> TrainConfig:
    cfg = apply_overrides(preset(name), list(overrides))
    return replace(cfg, steps=steps) if steps is not None else cfg
