"""RotateKV's transforms, shared by its simulated cache, its packed cache and its kernels.

Keys: k_stored = P . blockdiag(H_n) . k, where H_n is an orthonormal Hadamard over a group of
consecutive KV heads (n = heads_per_group * head_dim) and P permutes all KV channels of a token
(outlier-aware reordering). The read path undoes P and applies H again (it is its own inverse).
"""

from __future__ import annotations

import torch

from kvbench.hadamard import hadamard_transform, inverse_hadamard_transform


def heads_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """[B, H, T, D] -> [B, T, H*D]: one token's channels of all KV heads side by side."""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


def tokens_to_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, T, H*D] -> [B, H, T, D]."""
    b, t, c = x.shape
    return x.reshape(b, t, num_heads, c // num_heads).transpose(1, 2)


def grouped_hadamard(x: torch.Tensor, group_channels: int, inverse: bool = False) -> torch.Tensor:
    """Hadamard over consecutive blocks of `group_channels` along the last dim of [..., C]."""
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // group_channels, group_channels)
    fn = inverse_hadamard_transform if inverse else hadamard_transform
    return fn(blocks).reshape(x.shape)


def reorder_from_means(channel_means: torch.Tensor) -> torch.Tensor:
    """The permutation that sorts channels ascending by their signed mean: stored = x[..., perm]."""
    return torch.argsort(channel_means, stable=True)


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


def sink_tokens(layer_input: torch.Tensor, valid: torch.Tensor, count: int) -> torch.Tensor:
    """[B, T] bool marking the tokens that hold the `count` largest |activations| of each row.

    `layer_input` [B, T, hidden] is the residual stream entering the layer (before its norm);
    padding (`valid` False) is never a sink. Several of the largest values usually sit in the
    same few tokens, so fewer than `count` tokens are marked.
    """
    b, t, hidden = layer_input.shape
    magnitude = layer_input.float().abs().masked_fill(~valid[:, :, None], -1.0).reshape(b, t * hidden)
    top = magnitude.topk(min(count, t * hidden), dim=-1).indices // hidden  # token of each value
    sinks = torch.zeros(b, t, dtype=torch.bool, device=layer_input.device)
    sinks.scatter_(1, top, True)
    return sinks & valid
