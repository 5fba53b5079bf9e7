"""The VQ-GAN decoder (codes -> pixels), which transformers' `ChameleonVQVAE` does not include.

The classic taming-transformers VQGAN decoder: conv_in, a mid block (res, attention, res), one up
level per channel multiplier (num_res_blocks + 1 residual blocks, optional attention, nearest x2
upsample + conv on every level but the first), norm_out, swish, conv_out. Parameter names are the
`decoder.*` keys of the original `vqgan.ckpt` (e.g. `decoder.mid.attn_1.q.weight`,
`decoder.up.1.upsample.conv.weight`) and load strictly. The residual and attention blocks are
transformers' own Chameleon VQ blocks, which have the same layout as the decoder's.

    from shards.vq import load_vq
    from shards.vq_decoder import decode
    images = decode(load_vq("ckpts/chameleon/tokenizer"), codes)   # (B, H, W, 3) uint8

Pixels: clamp(-1, 1), then round((x + 1) * 127.5) to uint8.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import RynnError
from shards.vq_arch import check_state, hf_config


class DecoderError(RynnError):
    """No decoder weights, or decoder weights that do not fit the architecture."""


def _blocks():
    # transformers: seconds to import, only loading a model needs it
    from transformers.models.chameleon.modeling_chameleon import (
        ChameleonVQVAEEncoderAttnBlock, ChameleonVQVAEEncoderResnetBlock)
    return ChameleonVQVAEEncoderResnetBlock, ChameleonVQVAEEncoderAttnBlock


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Decoder(nn.Module):
    """taming `Decoder` (no timestep embedding), built from original yaml fields."""

    def __init__(self, arch: dict[str, Any]) -> None:
        super().__init__()
        res_block, attn_block = _blocks()
        cfg = hf_config(arch)
        ch, mult, n_res = arch["ch"], list(arch["ch_mult"]), arch["num_res_blocks"]
        block_in = ch * mult[-1]
        curr_res = arch["resolution"] // 2 ** (len(mult) - 1)
        self.conv_in = nn.Conv2d(arch["z_channels"], block_in, kernel_size=3, stride=1, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = res_block(cfg, block_in, block_in)
        self.mid.attn_1 = attn_block(block_in)
        self.mid.block_2 = res_block(cfg, block_in, block_in)
        self.up = nn.ModuleList()
        for level in reversed(range(len(mult))):
            up = nn.Module()
            up.block, up.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(n_res + 1):
                up.block.append(res_block(cfg, block_in, ch * mult[level]))
                block_in = ch * mult[level]
                if curr_res in arch["attn_resolutions"]:
                    up.attn.append(attn_block(block_in))
            if level != 0:
                up.upsample = Upsample(block_in)
                curr_res *= 2
            self.up.insert(0, up)
        self.norm_out = nn.GroupNorm(num_groups=32, num_channels=block_in, eps=1e-6, affine=True)
        self.conv_out = nn.Conv2d(block_in, arch["out_ch"], kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(range(len(self.up))):
            up = self.up[level]
            for i, block in enumerate(up.block):
                h = block(h)
                if len(up.attn):
                    h = up.attn[i](h)
            if level != 0:
                h = up.upsample(h)
        h = self.norm_out(h)
        return self.conv_out(h * torch.sigmoid(h))


def build_decoder(arch: dict[str, Any]) -> Decoder:
    return Decoder(arch).eval()


def check_decoder_state(state: dict[str, torch.Tensor], arch: dict[str, Any], *, where: str) -> None:
    """Raise unless `decoder.*` keys and shapes match the architecture exactly."""
    with torch.device("meta"):
        expected = {f"decoder.{k}": tuple(v.shape) for k, v in Decoder(arch).state_dict().items()}
    check_state(state, expected, "decoder", where=where)


def decoder_for(handle) -> Decoder:
    """The handle's decoder, built and strictly loaded on first use."""
    if "decoder" not in handle.cache:
        if not handle.decoder_state:
            raise DecoderError(f"this VQ-GAN ({handle.source}) has no decoder weights: decoding "
                               "needs the original vqgan.ckpt (Hugging Face checkpoints drop "
                               "the decoder)")
        decoder = build_decoder(handle.arch)
        decoder.load_state_dict({k[len("decoder."):]: v.float()
                                 for k, v in handle.decoder_state.items()}, strict=True)
        handle.cache["decoder"] = decoder.to(handle.device)
    return handle.cache["decoder"]


@torch.inference_mode()
def decode(handle, codes: np.ndarray | torch.Tensor) -> np.ndarray:
    """codes (B, h, w) -> uint8 images (B, 16h, 16w, 3)."""
    codes = torch.as_tensor(np.asarray(codes).astype(np.int64)).to(handle.device)
    n_embed = handle.arch["n_embed"]
    if codes.ndim != 3:
        raise DecoderError(f"codes must be (B, h, w), got shape {tuple(codes.shape)}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= n_embed):
        raise DecoderError(f"codes must be in [0, {n_embed}), got {int(codes.min())}.."
                           f"{int(codes.max())}")
    model = handle.model
    latent = model.quantize.embedding(codes).permute(0, 3, 1, 2).contiguous()
    pixels = decoder_for(handle)(model.post_quant_conv(latent))
    pixels = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()
