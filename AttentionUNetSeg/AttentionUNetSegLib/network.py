"""3D Attention U-Net of Oktay et al. (MIDL 2018), the CT model with multi-gates and deep supervision.

Follows the structure of the authors' ``unet_CT_multi_att_dsv_3D``: a 5-level encoder, additive grid
attention gates on the skips of levels 2-4 (level 1 is not gated), a trilinear-upsampling decoder and
deep supervision heads fused by a 1x1x1 convolution. Written from the paper and that structure.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

BASE_FILTERS = (64, 128, 256, 512, 1024)
GATED_LEVELS = (2, 3, 4)
DEEP_LEVELS = (3, 4, 5)  # coarse levels: context and recognition, and little compute on 8x fewer voxels


@dataclass(frozen=True)
class NetworkConfig:
    """Every architectural choice; stored in the weights file so a model rebuilds itself."""

    in_channels: int = 1
    num_classes: int = 2
    feature_scale: int = 4
    norm: str = "batch"  # "batch" or "instance"
    gates_per_level: int = 2
    deep_supervision: bool = True
    # Filters of levels 3-5 times this: 2 quadruples the parameters for about 1.2x the time on a CPU, where
    # the full-resolution levels (memory-bound) dominate a step.
    deep_width: int = 1

    @property
    def filters(self) -> list[int]:
        return [f // self.feature_scale * (self.deep_width if level in DEEP_LEVELS else 1)
                for level, f in enumerate(BASE_FILTERS, start=1)]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> NetworkConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown network settings {sorted(unknown)}")
        return cls(**values)

    def __post_init__(self):
        if self.norm not in ("batch", "instance"):
            raise ValueError(f"norm must be 'batch' or 'instance', not {self.norm!r}")
        if self.gates_per_level < 1:
            raise ValueError("gates_per_level must be at least 1")
        if self.deep_width < 1:
            raise ValueError("deep_width must be at least 1")
        if min(self.filters) < 1:
            raise ValueError(f"feature_scale {self.feature_scale} leaves a level without filters")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    return nn.InstanceNorm3d(channels, affine=True)


def _conv_norm_relu(in_ch: int, out_ch: int, kernel: int, norm: str) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(in_ch, out_ch, kernel, padding=kernel // 2, bias=False),
        _norm(norm, out_ch),
        nn.ReLU(inplace=True),
    )


class ConvBlock(nn.Sequential):
    """Two 3x3x3 conv + norm + ReLU (the paper's UnetConv3)."""

    def __init__(self, in_ch: int, out_ch: int, norm: str):
        super().__init__(_conv_norm_relu(in_ch, out_ch, 3, norm), _conv_norm_relu(out_ch, out_ch, 3, norm))


class GridAttentionGate(nn.Module):
    """Additive attention gate; alpha is computed on a grid twice as coarse as the skip.

    theta subsamples the skip with a strided conv, phi projects the gating signal, both meet on
    theta's grid; psi + sigmoid give alpha, which is resampled trilinearly to the skip's grid.
    """

    def __init__(self, skip_ch: int, gate_ch: int, inter_ch: int, norm: str):
        super().__init__()
        self.theta = nn.Conv3d(skip_ch, inter_ch, kernel_size=2, stride=2, bias=False)
        self.phi = nn.Conv3d(gate_ch, inter_ch, kernel_size=1)
        self.psi = nn.Conv3d(inter_ch, 1, kernel_size=1)
        self.out = nn.Sequential(nn.Conv3d(skip_ch, skip_ch, kernel_size=1), _norm(norm, skip_ch))

    def forward(self, skip: torch.Tensor, gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        theta = self.theta(skip)
        phi = F.interpolate(self.phi(gate), size=theta.shape[2:], mode="trilinear", align_corners=False)
        alpha = torch.sigmoid(self.psi(F.relu(theta + phi)))
        alpha = F.interpolate(alpha, size=skip.shape[2:], mode="trilinear", align_corners=False)
        return self.out(skip * alpha), alpha


class MultiAttentionBlock(nn.Module):
    """Several gates in parallel on one skip, fused by a 1x1x1 conv + norm + ReLU (the paper's CT model)."""

    def __init__(self, skip_ch: int, gate_ch: int, gates: int, norm: str):
        super().__init__()
        self.gates = nn.ModuleList(GridAttentionGate(skip_ch, gate_ch, skip_ch, norm) for _ in range(gates))
        self.fuse = _conv_norm_relu(skip_ch * gates, skip_ch, 1, norm) if gates > 1 else nn.Identity()

    def forward(self, skip: torch.Tensor, gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gated, alphas = zip(*(g(skip, gate) for g in self.gates))
        return self.fuse(torch.cat(gated, dim=1)), torch.cat(alphas, dim=1)


class UpBlock(nn.Module):
    """Trilinear x2 upsampling of the coarser features, concatenation with the skip, conv block."""

    def __init__(self, coarse_ch: int, skip_ch: int, norm: str):
        super().__init__()
        self.conv = ConvBlock(coarse_ch + skip_ch, skip_ch, norm)

    def forward(self, skip: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(coarse, size=skip.shape[2:], mode="trilinear", align_corners=False)
        return self.conv(torch.cat([skip, up], dim=1))


class AttentionUNet3D(nn.Module):
    """The paper's CT Attention U-Net.

    ``forward(x)`` returns logits of shape (N, classes, D, H, W). With ``return_attention=True`` it also
    returns ``{level: alpha}`` for the gated levels 2, 3 and 4, each alpha of shape
    (N, gates_per_level, ...) on that level's grid (level k is 2**(k-1) times coarser than the input).
    Input sizes must be multiples of 16 (four poolings).
    """

    def __init__(self, config: NetworkConfig = NetworkConfig()):
        super().__init__()
        self.config = config
        f, norm, n = config.filters, config.norm, config.num_classes
        self.encoders = nn.ModuleList(
            ConvBlock(c_in, c_out, norm) for c_in, c_out in zip([config.in_channels, *f[:3]], f[:4])
        )
        self.center = ConvBlock(f[3], f[4], norm)
        self.gating = _conv_norm_relu(f[4], f[4], 1, norm)
        # Gate at level k sits on skip f[k-1] and is driven by the signal one level below (f[k]).
        self.attention = nn.ModuleDict(
            {str(k): MultiAttentionBlock(f[k - 1], f[k], config.gates_per_level, norm) for k in GATED_LEVELS}
        )
        self.decoders = nn.ModuleList(UpBlock(f[k + 1], f[k], norm) for k in range(4))
        if config.deep_supervision:
            self.heads = nn.ModuleList(nn.Conv3d(f[k], n, kernel_size=1) for k in range(4))
            self.final = nn.Conv3d(4 * n, n, kernel_size=1)
        else:
            self.final = nn.Conv3d(f[0], n, kernel_size=1)

    @property
    def attention_levels(self) -> tuple[int, ...]:
        return GATED_LEVELS

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        skips = []
        for level, encoder in enumerate(self.encoders):
            x = encoder(x if level == 0 else F.max_pool3d(x, 2))
            skips.append(x)
        x = self.center(F.max_pool3d(x, 2))
        gate = self.gating(x)
        alphas: dict[int, torch.Tensor] = {}
        decoded = []
        for k in (4, 3, 2, 1):
            skip = skips[k - 1]
            if k in GATED_LEVELS:
                skip, alphas[k] = self.attention[str(k)](skip, gate if k == 4 else x)
            x = self.decoders[k - 1](skip, x)
            decoded.append(x)
        logits = self._output(decoded[::-1], size=skips[0].shape[2:])
        return (logits, alphas) if return_attention else logits

    def _output(self, decoded: list[torch.Tensor], size) -> torch.Tensor:
        if not self.config.deep_supervision:
            return self.final(decoded[0])
        # Each decoder level predicts the classes; coarser heads are upsampled to full size.
        heads = [head(m) for head, m in zip(self.heads, decoded)]
        heads = [h if h.shape[2:] == size else F.interpolate(h, size=size, mode="trilinear", align_corners=False)
                 for h in heads]
        return self.final(torch.cat(heads, dim=1))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
