"""The Action Transformer head (SPEC.md 7): context hidden states + K*D learnable queries ->
2-layer bidirectional encoder -> MLP-ResNet -> (K, D) actions in normalized [-1, 1] space.

    head = ActionHead(hidden=4096, chunk=10, action_dim=7, width=1024)
    actions = head(context_hidden, keep)   # keep: (B, L) True for real context positions
"""

from __future__ import annotations

import torch
from torch import nn


class ResidualBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, width)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.fc(self.norm(x)))


class MLPResNet(nn.Module):
    """(..., in_dim) -> width -> 2 residual blocks -> LayerNorm -> out_dim."""

    def __init__(self, in_dim: int, width: int, out_dim: int, blocks: int = 2) -> None:
        super().__init__()
        self.inp = nn.Linear(in_dim, width)
        self.blocks = nn.Sequential(*[ResidualBlock(width) for _ in range(blocks)])
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(self.blocks(self.inp(x))))


class ActionHead(nn.Module):
    def __init__(self, *, hidden: int, chunk: int, action_dim: int, width: int = 1024,
                 heads: int = 4, layers: int = 2, ffn: int = 4096, dropout: float = 0.1) -> None:
        super().__init__()
        self.chunk, self.action_dim, self.width = chunk, action_dim, width
        self.proj = nn.Linear(hidden, width)
        self.queries = nn.Parameter(torch.randn(chunk * action_dim, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, ffn, dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.mlp = MLPResNet(action_dim * width, width, action_dim)

    def forward(self, context: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """context (B, L, hidden), keep (B, L) bool -> (B, K, D). Padding never changes outputs."""
        b = context.shape[0]
        x = torch.cat([self.proj(context), self.queries.expand(b, -1, -1).to(context.dtype)], 1)
        q_keep = torch.ones(b, self.queries.shape[0], dtype=torch.bool, device=keep.device)
        pad = ~torch.cat([keep.bool(), q_keep], dim=1)
        x = self.norm(self.encoder(x, src_key_padding_mask=pad))
        q = x[:, -self.queries.shape[0]:].reshape(b, self.chunk, self.action_dim * self.width)
        return self.mlp(q)
