"""Rotary position embedding of MLA's roped channels, with DeepSeek's YaRN extension.

Follows DeepSeek's reference code and transformers' DeepseekV2/V3 implementation:
frequencies in float32, YaRN blends interpolated and extrapolated frequencies with a linear
ramp over the dimensions between the beta_fast and beta_slow correction points, cos/sin are
multiplied by YaRN's attention factor, and the softmax scale gains mscale(mscale_all_dim)^2.

Layouts. With `interleave` the roped channels come in pairs (x0, x1), (x2, x3), ... (DeepSeek's
checkpoints); otherwise in halves (x[:d/2], x[d/2:]). `apply_rope` always returns the
half-split layout: queries and keys are permuted alike, so their dot products are unchanged,
and one output layout keeps the cache independent of the checkpoint convention (it is also
what transformers' DeepseekV3 stores).
"""

from __future__ import annotations

import math

import torch

from mla.config import MLAConfig


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1 * mscale * ln(scale) + 1 (1 when scale <= 1)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(config: MLAConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the cos/sin attention factor.

    Returns:
        inv_freq: float32 [qk_rope_head_dim // 2].
        attention_factor: float multiplying cos and sin (1 without YaRN). With YaRN it is
            mscale(factor, mscale) / mscale(factor, mscale_all_dim) when both are non-zero,
            else mscale(factor, 1), as transformers computes it.
    """
    dim, base = config.qk_rope_head_dim, config.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    scaling = config.rope_scaling
    if scaling is None:
        return 1.0 / pos_freqs, 1.0

    factor = scaling["factor"]
    original = scaling["original_max_position_embeddings"]

    def correction_dim(num_rotations: float) -> float:
        # the dimension whose wavelength fits num_rotations times into the original context
        return dim * math.log(original / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(scaling["beta_fast"])), 0)
    high = min(math.ceil(correction_dim(scaling["beta_slow"])), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    # below `low` the dimensions rotate fast enough to extrapolate; above `high` they are
    # interpolated by `factor`; in between the two blend linearly
    extrapolate = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate

    mscale, mscale_all_dim = scaling["mscale"], scaling["mscale_all_dim"]
    if mscale and mscale_all_dim:
        attention_factor = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
    else:
        attention_factor = yarn_get_mscale(factor)
    return inv_freq, float(attention_factor)


def softmax_scale(config: MLAConfig) -> float:
    """qk_head_dim ** -0.5, times mscale(factor, mscale_all_dim) ** 2 under YaRN (DeepSeek's correction)."""
    scale = config.qk_head_dim**-0.5
    scaling = config.rope_scaling
    if scaling is not None and scaling["mscale_all_dim"]:
        scale *= yarn_get_mscale(scaling["factor"], scaling["mscale_all_dim"]) ** 2
    return scale


class RotaryEmbedding:
    """cos/sin tables of positions for one config.

    A plain object, not a module: its float32 frequencies must survive `model.to(bfloat16)`
    and must not appear in state dicts. They follow the positions' device on first use there.
    """

    def __init__(self, config: MLAConfig):
        self.inv_freq, self.attention_factor = rope_frequencies(config)
        self.interleave = config.rope_interleave

    def __call__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: integer [...] -> (cos, sin), float32 [..., qk_rope_head_dim // 2], times the attention factor."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        angles = positions[..., None].float() * self.inv_freq
        return angles.cos() * self.attention_factor, angles.sin() * self.attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate the pairs of x's last dim by the angles of cos/sin.

    Args:
        x: [..., d] in any float dtype; pairs interleaved (`interleave`) or split in halves.
        cos, sin: float32 [..., d // 2], broadcastable against x's leading dims.

    Returns:
        [..., d] in x's dtype, half-split layout: [x1 cos - x2 sin | x2 cos + x1 sin],
        computed in at least float32.
    """
    x1, x2 = (x[..., 0::2], x[..., 1::2]) if interleave else x.chunk(2, dim=-1)
    dtype = torch.promote_types(x.dtype, torch.float32)
    x1, x2 = x1.to(dtype), x2.to(dtype)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
