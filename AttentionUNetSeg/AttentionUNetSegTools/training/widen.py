"""Warm-start a wider network from a narrower one's weights, computing the same function.

The new channels get a fresh initialisation and every old channel reads them with a zero weight, so the
wider network starts where the narrow one was (outputs equal up to float summation order) and training
grows the new channels from there (the zero weights get gradients at once; the new channels once those
are non-zero).
Net2Net (Chen et al., ICLR 2016) widens by copying channels instead; zero-reading needs no symmetry breaking.
"""

from __future__ import annotations

import re
from dataclasses import replace

import torch

from AttentionUNetSegLib.network import AttentionUNet3D, NetworkConfig

# Convolutions whose input is a concatenation: the old channels of each part move to that part's new start.
_DECODER_INPUT = re.compile(r"decoders\.(\d)\.conv\.0\.0\.weight")  # cat([skip of level k+1, upsampled k+2])
_FUSE_INPUT = re.compile(r"attention\.(\d)\.fuse\.0\.weight")  # cat of the gates' outputs on level k's skip


def can_widen(narrow: NetworkConfig, wide: NetworkConfig) -> bool:
    """Only the width differs, and no level gets narrower."""
    same_otherwise = replace(narrow, feature_scale=wide.feature_scale, deep_width=wide.deep_width) == wide
    return same_otherwise and all(n <= w for n, w in zip(narrow.filters, wide.filters))


def widen(narrow: AttentionUNet3D, config: NetworkConfig) -> AttentionUNet3D:
    if not can_widen(narrow.config, config):
        raise ValueError(f"cannot widen {narrow.config} to {config}")
    wide = AttentionUNet3D(config)
    old_state = narrow.state_dict()
    new_state = wide.state_dict()
    for key, new in new_state.items():
        old = old_state[key]
        if new.shape == old.shape:
            new.copy_(old)
        elif new.dim() == 1:  # bias and batch-norm vectors of widened outputs
            new[: old.shape[0]] = old
        else:
            _place_weight(new, old, _input_parts(key, narrow.config, config))
    wide.load_state_dict(new_state)
    return wide


def _input_parts(key: str, narrow: NetworkConfig, wide: NetworkConfig) -> list[tuple[int, int]]:
    """(old, new) channel counts of each concatenated part of a weight's input."""
    if match := _DECODER_INPUT.fullmatch(key):
        k = int(match.group(1))  # decoders[k] joins the skip of level k+1 with level k+2 upsampled
        return [(narrow.filters[k], wide.filters[k]), (narrow.filters[k + 1], wide.filters[k + 1])]
    if match := _FUSE_INPUT.fullmatch(key):
        level = int(match.group(1))
        part = (narrow.filters[level - 1], wide.filters[level - 1])
        return [part] * narrow.gates_per_level
    return []


def _place_weight(new: torch.Tensor, old: torch.Tensor, parts: list[tuple[int, int]]) -> None:
    """Old output channels: their old weights, zero on new inputs. New output channels keep their init."""
    old_out = old.shape[0]
    parts = parts or [(old.shape[1], new.shape[1])]
    new[:old_out] = 0
    old_start = new_start = 0
    for old_size, new_size in parts:
        new[:old_out, new_start : new_start + old_size] = old[:, old_start : old_start + old_size]
        old_start, new_start = old_start + old_size, new_start + new_size
