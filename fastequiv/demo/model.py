"""The demo's model: a plain transformer on atoms (:class:`PointTransformer`), and the
:class:`~fastequiv.Spec` of its inputs and output (:data:`SPEC`)."""

from __future__ import annotations

import torch
from torch import nn

import fastequiv as fe

from .data import CUTOFF, SPECIES

__all__ = ["PointTransformer", "SPEC"]


class _Block(nn.Module):
    """One pre-norm transformer layer: multi-head self-attention with an additive bias on
    the attention logits, then a GELU MLP, each in a residual branch."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        B, N, W = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(B, N, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        a = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        h = h + self.proj(a.transpose(1, 2).reshape(B, N, W))
        return h + self.mlp(self.norm2(h))


class PointTransformer(nn.Module):
    """A plain transformer on atoms: nothing in it knows about rotations.

    Each atom is embedded from its coordinates relative to the cluster's centroid (a linear
    map of the raw x, y, z) plus a learned species embedding; pre-norm self-attention layers
    mix the atoms, with a learned bias on the attention logits from Gaussian features of the
    pair distances (one per head and layer; padded atoms are masked out); a linear head
    reads a 3D force per atom. The distances only steer which atoms attend to which: every
    vector the model reads or writes goes through unconstrained linear maps and
    nonlinearities, so a rotated input is not a rotated output unless training makes it so.
    """

    def __init__(self, width: int = 64, heads: int = 4, layers: int = 3, species: int = SPECIES,
                 radial: int = 16, cutoff: float = CUTOFF):
        super().__init__()
        self.heads, self.layers = heads, layers
        self.embed_pos = nn.Linear(3, width)
        self.embed_species = nn.Embedding(species, width)
        self.register_buffer("centres", torch.linspace(0.0, cutoff, radial), persistent=False)
        self.gamma = (radial / cutoff) ** 2
        self.pair_bias = nn.Linear(radial, heads * layers)
        self.blocks = nn.ModuleList(_Block(width, heads) for _ in range(layers))
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 3))

    def forward(self, pos: torch.Tensor, species: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        w = mask[..., None].to(pos.dtype)
        centre = (pos * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1)
        h = self.embed_pos(pos - centre) + self.embed_species(species)
        # invariant attention biases from the pair distances, (B, layers * heads, N, N)
        r = ((pos[:, :, None] - pos[:, None, :]) ** 2).sum(-1).add(1e-12).sqrt()
        bias = self.pair_bias(torch.exp(-self.gamma * (r[..., None] - self.centres) ** 2)).permute(0, 3, 1, 2)
        bias = bias.masked_fill(~mask[:, None, None, :], float("-inf"))  # padded atoms are never attended to
        for i, block in enumerate(self.blocks):
            h = block(h, bias[:, i * self.heads:(i + 1) * self.heads])
        # padded atoms' rows carry no meaning: their force is 0
        return torch.where(mask[..., None], self.head(h), torch.zeros((), dtype=pos.dtype, device=pos.device))


SPEC = fe.Spec(inputs={"pos": "position", "species": "scalar", "mask": "scalar"}, output="vector", mask="mask")
