"""Chameleon's VQ-GAN (SPEC.md 5) through transformers' `ChameleonVQVAE`: loading, preprocessing, encoding.

Weights come from a local path in either form users have, or from a seeded random init:

    from shards.vq import load_vq, preprocess, encode
    vq = load_vq("ckpts/chameleon/tokenizer")        # vqgan.yaml + vqgan.ckpt (original release)
    vq = load_vq("ckpts/chameleon-7b")               # Hugging Face Chameleon dir (model.vqmodel.*)
    vq = load_vq(None, random_arch="small")          # UNTRAINED, seeded; said loudly
    codes = encode(vq, preprocess(frames_uint8_nhwc, 256))   # (B, 16, 16) int64

Original checkpoints: the 129 non-decoder keys of `vqgan.ckpt` have the transformers module's names
and shapes, so they load strictly; `decoder.*` keys are kept for `shards.vq_decoder`; `loss.*`
(discriminator / perceptual network) keys are ignored by name; anything else is an error.

Precision: "fp32" (default) is exact. "bf16-mixed" runs the encoder and `quant_conv` under bf16
autocast but always does the nearest-code search in fp32 (a fully bf16 search changes about half
the codes); `agreement()` measures how many codes it keeps.

The weight digest is the sha256 of the loaded fp32 VQ module's state dict (key, dtype, shape and
bytes, keys sorted), so the same weights give the same digest in either checkpoint format.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError, safe_open

from pipeline.config import ConfigError
from pipeline.errors import DataError
from pipeline.group import Group
from pipeline.progress import console
from shards.records import VQRecord
from shards.vq_arch import (DDCONFIG_KEYS, RANDOM_ARCHS, CheckpointError, arch_from_hf, check_state,
                            checked_arch, hf_config, preview)
from shards.vq_decoder import build_decoder, check_decoder_state

ORIGINAL_YAML = "vqgan.yaml"
ORIGINAL_CKPT = "vqgan.ckpt"
HF_PREFIX = "model.vqmodel."
DECODER_PREFIX = "decoder."
IGNORED_PREFIXES = ("loss.",)
PRECISIONS = ("fp32", "bf16-mixed")
_WARNED: set[tuple[str, int]] = set()   # random VQ-GANs already announced in this process



@dataclass
class VQHandle:
    """A loaded VQ-GAN: the transformers module plus what the store records about it."""

    model: torch.nn.Module                    # transformers ChameleonVQVAE, eval mode
    record: VQRecord                          # identity, digest and architecture
    decoder_state: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    cache: dict[str, Any] = field(default_factory=dict, repr=False)  # e.g. the built decoder

    @property
    def digest(self) -> str:
        """sha256 of the VQ module's state dict."""
        return self.record.digest

    @property
    def arch(self) -> dict[str, Any]:
        """Original yaml field names (see FULL_ARCH)."""
        return self.record.arch

    @property
    def untrained(self) -> bool:
        """True for a random init: its tokens mean nothing."""
        return self.record.untrained

    @property
    def source(self) -> str:
        """"original", "hf" or "random-<arch>-seed<n>" (the identity string of store.json)."""
        return self.record.source

    @property
    def grid(self) -> int:
        """Downsampling factor: 2 ** (levels - 1) (16 for Chameleon)."""
        return 2 ** (len(self.arch["ch_mult"]) - 1)


# ---------------------------------------------------------------------------------------------
# Architecture <-> transformers config.
# ---------------------------------------------------------------------------------------------

def build_model(arch: dict[str, Any]) -> torch.nn.Module:
    # transformers: seconds to import, only loading a model needs it
    from transformers.models.chameleon.modeling_chameleon import ChameleonVQVAE
    return ChameleonVQVAE(hf_config(arch)).eval()


def state_digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Loading.
# ---------------------------------------------------------------------------------------------

def load_vq(path: str | Path | None, *, random_arch: str = "full", seed: int = 0,
            device: str | torch.device = "auto") -> VQHandle:
    """Load a VQ-GAN from an original or Hugging Face checkpoint, or a seeded random init (None).

    device: "cpu", "cuda", "auto" (cuda when available) or a torch device.
    """
    if path is None:
        handle = random_vq(RANDOM_ARCHS[random_arch], seed, name=random_arch)
    else:
        handle = _load_path(Path(path))
    return to_device(handle, device)


class VQMismatch(DataError):
    """The VQ-GAN at hand is not the one a record names (its digest differs), or the record
    names weights whose path was not given."""


def load_vq_from_record(record: VQRecord, path: str | Path | None = None, *,
                        device: str | torch.device = "auto", check: bool = True) -> VQHandle:
    """The VQ-GAN a manifest or card record names: the weights at `path` when given, else the
    seeded random init the record describes (a record of weights needs `path`). With `check`,
    a digest other than the record's raises `VQMismatch`; without, the caller compares."""
    if path is None and not record.untrained:
        raise VQMismatch(f"these image tokens come from VQ-GAN weights ({record.format} format, "
                         f"digest {record.digest}); pass their path (vq_path / --vq-path)")
    handle = (load_vq(path, device=device) if path is not None else
              load_vq(None, random_arch=record.name, seed=record.seed, device=device))
    if check and handle.digest != record.digest:
        raise VQMismatch(f"VQ-GAN {path or record.source} has digest {handle.digest}, but the "
                         f"tokens were made with {record.digest}: its image tokens would differ; "
                         "pass the VQ-GAN used by the pretokenize stage")
    return handle


def to_device(handle: VQHandle, device: str | torch.device) -> VQHandle:
    dev = resolve_device(device)
    handle.model.to(dev)
    handle.device = dev
    handle.cache.clear()
    return handle


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and (not torch.cuda.is_available()
                               or (dev.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(f"image.device={device}: no such CUDA device here "
                          f"({torch.cuda.device_count()} visible); use image.device=auto or cpu")
    return dev


def random_vq(arch: dict[str, Any], seed: int, *, name: str = "custom") -> VQHandle:
    """A seeded random-init VQ-GAN with a random decoder. Its tokens are UNTRAINED."""
    arch = checked_arch(dict(arch), f"random arch {name}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(arch)
        decoder = build_decoder(arch)
    decoder_state = {DECODER_PREFIX + k: v for k, v in decoder.state_dict().items()}
    if (name, seed) not in _WARNED and Group.from_env().leader:       # once, on rank 0
        _WARNED.add((name, seed))
        console.print(f"[bold red]WARNING: UNTRAINED TOKENIZER[/]: no VQ-GAN weights given "
                      f"(image.vq_path), using a random-init '{name}' VQ-GAN (seed {seed}). "
                      "Image tokens carry no visual meaning; set image.vq_path for real tokens.")
    record = VQRecord(kind="random", digest=state_digest(model.state_dict()), arch=arch,
                      name=name, seed=seed)
    return VQHandle(model=model, record=record, decoder_state=decoder_state)


def _load_path(path: Path) -> VQHandle:
    if not path.exists():
        raise CheckpointError("VQ-GAN checkpoint path does not exist; set image.vq_path to a "
                              f"{ORIGINAL_YAML}+{ORIGINAL_CKPT} directory, the .ckpt, or a "
                              "Hugging Face Chameleon directory", file=str(path))
    if path.is_dir() and (path / "config.json").exists():
        return load_hf(path)
    if path.is_dir():
        return load_original(path / ORIGINAL_YAML, path / ORIGINAL_CKPT)
    yaml_path = path.with_suffix(".yaml")
    return load_original(yaml_path if yaml_path.exists() else path.parent / ORIGINAL_YAML, path)


def read_original_yaml(path: Path) -> dict[str, Any]:
    """Architecture (original names) from a taming-style `vqgan.yaml`."""
    import yaml  # PyYAML (comes with transformers): only the original vqgan.yaml needs it
    if not path.exists():
        raise CheckpointError(f"{ORIGINAL_YAML} not found beside the checkpoint", file=str(path))
    with open(path) as f:
        doc = yaml.safe_load(f)
    try:
        params = doc["model"]["params"]
        dd = params["ddconfig"]
        arch = {"embed_dim": int(params["embed_dim"]), "n_embed": int(params["n_embed"]),
                **{k: dd[k] for k in DDCONFIG_KEYS}}
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"missing field {exc} (need model.params.embed_dim, n_embed and "
                              f"ddconfig.{{{', '.join(DDCONFIG_KEYS)}}})", file=str(path)) from exc
    arch["ch_mult"] = [int(v) for v in arch["ch_mult"]]
    arch["attn_resolutions"] = [int(v) for v in arch["attn_resolutions"] or []]
    return checked_arch(arch, str(path))


def torch_load(path: Path) -> Any:
    """torch.load with clear errors; weights-only first, full unpickling (trusted file) after."""
    if not path.exists():
        raise CheckpointError("checkpoint file not found", file=str(path))
    with open(path, "rb") as f:
        head = f.read(2)
    if not zipfile.is_zipfile(path) and head[:1] != b"\x80":
        raise CheckpointError("not a torch checkpoint (neither a torch zip archive nor a pickle)",
                              file=str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc):
            raise CheckpointError(f"unreadable torch checkpoint: {exc}", file=str(path)) from exc
        console.print(f"[yellow]WARNING[/]: {path} holds non-tensor Python objects; loading it "
                      "with full unpickling (only do this for files you trust)")
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"unreadable torch checkpoint: {exc}", file=str(path)) from exc
    return torch.load(path, map_location="cpu", weights_only=False)


def load_original(yaml_path: Path, ckpt_path: Path) -> VQHandle:
    """Original release: `vqgan.yaml` + `vqgan.ckpt` (torch file with `state_dict`)."""
    arch = read_original_yaml(yaml_path)
    blob = torch_load(ckpt_path)
    state = blob.get("state_dict") if isinstance(blob, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError("checkpoint has no 'state_dict' dictionary", file=str(ckpt_path))
    vq_state, decoder_state, other = split_original_keys(state)
    if other:
        raise CheckpointError(f"unexpected keys (not encoder/quantizer/decoder/loss): "
                              f"{preview(other)}", file=str(ckpt_path))
    model = build_model(arch)
    load_strict(model, vq_state, arch, where=str(ckpt_path))
    if decoder_state:
        check_decoder_state(decoder_state, arch, where=str(ckpt_path))
    record = VQRecord(kind="weights", digest=state_digest(model.state_dict()), arch=arch,
                      format="original")
    return VQHandle(model=model, record=record, decoder_state=decoder_state or None)


def split_original_keys(state: dict[str, torch.Tensor]
                        ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[str]]:
    """(VQ module keys, decoder.* keys, keys belonging to neither); loss.* keys are dropped."""
    vq, dec, other = {}, {}, []
    vq_roots = ("encoder.", "quant_conv.", "quantize.", "post_quant_conv.")
    for key, value in state.items():
        if key.startswith(DECODER_PREFIX):
            dec[key] = value
        elif key.startswith(vq_roots):
            vq[key] = value
        elif not key.startswith(IGNORED_PREFIXES):
            other.append(key)
    return vq, dec, sorted(other)


def load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], arch: dict[str, Any],
                *, where: str) -> None:
    """Load every key of the VQ module; any missing, unexpected or mis-shaped key is an error."""
    expected = model.state_dict()
    book = state.get("quantize.embedding.weight")
    if book is not None and book.shape[0] != arch["n_embed"]:
        raise CheckpointError(f"codebook size mismatch: the config says n_embed={arch['n_embed']} "
                              f"but quantize.embedding.weight has {book.shape[0]} codes", file=where)
    check_state(state, {k: tuple(v.shape) for k, v in expected.items()}, "VQ-GAN", where=where)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)


def load_hf(path: Path) -> VQHandle:
    """A Hugging Face Chameleon directory: config.json `vq_config` + `model.vqmodel.*` weights."""
    config = json.loads((path / "config.json").read_text())
    if "vq_config" not in config:
        raise CheckpointError("config.json has no 'vq_config': not a Chameleon checkpoint",
                              file=str(path / "config.json"))
    arch = arch_from_hf(config["vq_config"])
    state = read_hf_vq_weights(path)
    if not state:
        raise CheckpointError(f"no '{HF_PREFIX}*' weights in the safetensors files: this "
                              "checkpoint does not include the VQ model", file=str(path))
    model = build_model(arch)
    load_strict(model, state, arch, where=str(path))
    record = VQRecord(kind="weights", digest=state_digest(model.state_dict()), arch=arch,
                      format="hf")
    return VQHandle(model=model, record=record, decoder_state=None)


def read_hf_vq_weights(path: Path) -> dict[str, torch.Tensor]:
    """The `model.vqmodel.*` tensors (prefix stripped), reading only the shards that hold them."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({f for k, f in weight_map.items() if k.startswith(HF_PREFIX)})
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    state = {}
    for name in files:
        try:
            with safe_open(str(path / name), framework="pt") as f:
                for key in f.keys():
                    if key.startswith(HF_PREFIX):
                        state[key[len(HF_PREFIX):]] = f.get_tensor(key)
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"unreadable safetensors file: {exc}", file=str(path / name)) from exc
    return state


# ---------------------------------------------------------------------------------------------
# Preprocessing and encoding.
# ---------------------------------------------------------------------------------------------

PREPROCESSING = ("RGB uint8 HWC; resized to resolution x resolution with PIL bicubic (uint8, only "
                 "when the size differs); x/255*2-1 in float32; NCHW")


def resize_uint8(frames: np.ndarray, resolution: int) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, R, R, 3) uint8; PIL bicubic, untouched when already R x R."""
    if frames.shape[1:3] == (resolution, resolution):
        return frames
    out = [np.asarray(Image.fromarray(f).resize((resolution, resolution), Image.BICUBIC))
           for f in frames]
    return np.stack(out) if out else np.zeros((0, resolution, resolution, 3), np.uint8)


def preprocess(frames: np.ndarray, resolution: int) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> float32 (N, 3, R, R) in [-1, 1] (SPEC.md 5)."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise DataError(f"frames must be uint8 (N, H, W, 3), got {frames.dtype} {frames.shape}")
    return normalize_pixels(resize_uint8(frames, resolution))


def normalize_pixels(frames: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8, already fitted (any H, W) -> float32 (N, 3, H, W) in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(frames))
    x = x.permute(0, 3, 1, 2).float()
    return (x / 255 * 2 - 1).contiguous()


@torch.inference_mode()
def encode(handle: VQHandle, batch: torch.Tensor, *, precision: str = "fp32") -> torch.Tensor:
    """(B, 3, R, R) float in [-1, 1] -> codes (B, R/16, R/16) int64 on the CPU."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    model = handle.model
    x = batch.to(handle.device, non_blocking=True)
    with torch.autocast(handle.device.type, dtype=torch.bfloat16, enabled=precision != "fp32"):
        latent = model.quant_conv(model.encoder(x))
    _, _, idx = model.quantize(latent.float())  # nearest-code search always in fp32
    b, _, h, w = latent.shape
    return idx.view(b, h, w).cpu()


def agreement(handle: VQHandle, batch: torch.Tensor, precision: str = "bf16-mixed") -> float:
    """Fraction of codes `precision` shares with exact fp32 on `batch`."""
    ref = encode(handle, batch)
    return float((encode(handle, batch, precision=precision) == ref).double().mean())
