"""Matryoshka autoencoder co-trained with the FM (paper section 3, "Matryoshka compression").

``z = tanh(enc(e))`` in [-1, 1]^d (ready for the INT4 grid round(8z).clamp(-8, 7)/8); one
decoder per nested prefix d' reconstructs ``e`` from ``z[:, :d']``; the loss per example is
``sum_d' ||e - dec_d'(z[:, :d'])||^2``, so every prefix is a usable code. The input ``e`` is a
stop-gradient copy of the FM taps (the caller detaches it): no AE gradient reaches the FM.
"""
from __future__ import annotations

import torch
from torch import nn

from loopfm.fm.config import AutoencoderConfig


def _mlp(dims: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class MatryoshkaAutoencoder(nn.Module):
    def __init__(self, in_dim: int, cfg: AutoencoderConfig) -> None:
        super().__init__()
        self.in_dim, self.dim, self.prefixes = in_dim, cfg.dim, list(cfg.prefixes)
        self.encoder = _mlp([in_dim, *cfg.hidden, cfg.dim])
        self.decoders = nn.ModuleList(_mlp([p, *reversed(cfg.hidden), in_dim]) for p in self.prefixes)

    def encode(self, e: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.encoder(e))

    def forward(self, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z, loss per example)``."""
        z = self.encode(e)
        loss = torch.zeros_like(e[:, 0])
        for p, dec in zip(self.prefixes, self.decoders):
            loss = loss + (dec(z[:, :p]) - e).pow(2).sum(dim=1)
        return z, loss
