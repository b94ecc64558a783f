"""DeepSeek-V4's token compressor in plain PyTorch: the twin of `mla.kernels.compressor`.

Every m source tokens become one compressed KV entry of head_dim channels. Per window of m
tokens the caller has the tokens' projections kv = x W_kv and gate logits z = x W_gate
(width W = head_dim, or 2 * head_dim for an overlapping compressor) and a learned bias B
[m, W] per position in the window. Entry w (its window holds tokens w*m .. w*m + m - 1):

    HCA (W = d, no overlap, m' = 128):
        slots j = 0..m-1:   value kv[w, j, :],  logit z[w, j, :] + B[j, :]
    CSA and the CSA indexer's keys (W = 2d, overlap, m = 4): 2m slots, two series
        slots j = 0..m-1:   kv[w-1, j, :d], logit z[w-1, j, :d] + B[j, :d]  (previous window, "Ca")
        slots m + j:        kv[w, j, d:],   logit z[w, j, d:] + B[j, d:]    (this window, "Cb")
        For the first window of a sequence the Ca slots are absent (weight 0).

    pooled[c] = sum_slots softmax_over_slots(logit[:, c])[slot] * value[slot, c]   (per channel)
    normed    = norm_weight * pooled * rsqrt(mean(pooled ** 2) + eps)              (RMSNorm)
    entry     = normed with RoPE at position w * m (the window's FIRST token) applied to the
                last rope_dim channels, interleaved pairs (2i, 2i + 1):
                    (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos)

The entry exists once its window closes, i.e. after the window's last token, w * m + m - 1
(prefill: the first len // m windows; decode: when (pos + 1) % m == 0). All arithmetic is in
float32. `dtype` names the activation dtype DeepSeek rounds to at three points: the pooled sum
before the norm, the norm's output, and the roped channels (float32: no rounding).

Sources:
  - DeepSeek-V4's reference inference/model.py, class `Compressor` (read in the
    Nicooo-Wang/DeepSeek-V4-Pro-code copy): `wkv` and `wgate` Linear(dim, coff * head_dim) with
    coff = 2 exactly when ratio == 4 (overlap), `ape` float32 [ratio, coff * head_dim] added
    to the gate logits per position, `overlap_transform` (Ca of window w - 1 in the first m
    slots, filled with kv 0 / logit -inf for window 0; Cb of window w in the last m),
    `score.softmax(dim=2)` per channel, `norm` an RMSNorm of head_dim with float32 weight,
    `freqs_cis[:cutoff:ratio]` in prefill and `freqs_cis[start_pos + 1 - ratio]` in decode
    (both the window's first token), `apply_rotary_emb` on `kv[..., -rope_head_dim:]` with
    complex pairs of adjacent channels; then FP8 (64-channel blocks, UE8M0) on the first
    head_dim - rope_dim channels for the attention cache (`mla.formats.Model1Format`), or a
    Hadamard rotation and FP4 for the indexer's keys (`Indexer` builds its own `Compressor`
    with head_dim = index_head_dim; not done here).
  - transformers 5.24 models/deepseek_v4/modeling_deepseek_v4.py: `DeepseekV4HCACompressor`,
    `DeepseekV4CSACompressor`, `DeepseekV4Indexer` (kv_proj / gate_proj / position_bias /
    kv_norm), `DeepseekV4CSACache.update_overlap_state` (keeps the last window's Ca half).

Where the two differ (DeepSeek's choice is implemented):
  - Precision. DeepSeek casts x to float32 and projects with float32 weights, pools in
    float32, rounds the pooled sum to the activation dtype (bfloat16) before the norm, and
    rounds the norm output and the roped channels to it again. transformers projects in the
    model dtype and multiplies the float32 softmax weights, cast to that dtype, with kv and
    sums in that dtype (bfloat16 in a bfloat16 model). In float32 / float64 both are the math
    above.
  - RoPE table. DeepSeek's YaRN table for compressed layers has no magnitude scale
    (`torch.polar(ones, freqs)`); transformers forces `attention_factor=1.0` for the
    "compress" rope to match. The caller passes cos / sin, so this module takes no side.
  - State across calls. DeepSeek's decode keeps float32 kv / score state buffers of 2m rows
    (the previous window's and the current window's tokens, logits with `ape` added) that are
    not cleared between requests: a prefill shorter than m leaves the previous request's Ca
    rows in place, which the first window then pools. transformers starts each sequence
    without them (weight 0), as here: pass prev_kv / prev_gate only for a continuation.
    Both store the gate logits of pending tokens with the bias already added; here prev_gate
    is the raw logits, like gate (the bias is added inside, the same float32 sum).
  - Calls. DeepSeek's reference runs one prefill from position 0, then one token per step;
    transformers' cache also takes later multi-token chunks (its buffer keeps the tokens past
    the last complete window). Either way an entry depends only on its window's tokens.

Argument checks live in `check_compress_args` / `check_write_args`, shared with the kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mla.formats import PLAIN_DTYPES, Model1Format, _check_slots


@dataclass(frozen=True)
class CompressShape:
    """What a compress call computes: n entries of head_dim channels from windows of m tokens,
    RoPE on the last rope_dim channels, overlapping windows (CSA) or not (HCA)."""

    n: int
    m: int
    head_dim: int
    rope_dim: int
    overlap: bool
    has_prev: bool


def _check_float(name: str, t, dims: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in PLAIN_DTYPES:
        raise TypeError(f"{name} must be bfloat16, float16 or float32, got {t.dtype}")
    if t.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimensions, got shape {tuple(t.shape)}")
    return t


def check_compress_args(kv, gate, bias, norm_weight, cos, sin, prev_kv, prev_gate, eps, dtype) -> CompressShape:
    """Validate the arguments of `compress` (documented there); ValueError / TypeError name the
    argument and the bad value. Returns the call's shape."""
    _check_float("kv", kv, 3)
    _check_float("gate", gate, 3)
    _check_float("bias", bias, 2)
    _check_float("norm_weight", norm_weight, 1)
    _check_float("cos", cos, 2)
    _check_float("sin", sin, 2)
    n, m, width = kv.shape
    d = norm_weight.shape[0]
    if gate.shape != kv.shape:
        raise ValueError(f"gate {tuple(gate.shape)} must have kv's shape {tuple(kv.shape)}")
    if m < 1 or d < 2 or d % 2:
        raise ValueError(f"kv must hold windows of m >= 1 tokens and norm_weight an even head_dim >= 2, got "
                         f"kv {tuple(kv.shape)}, norm_weight {tuple(norm_weight.shape)}")  # fmt: skip
    if width not in (d, 2 * d):
        raise ValueError(
            f"kv's last dimension must be head_dim = {d} (no overlap) or 2 * head_dim = {2 * d} (overlap), "
            f"got {width}"
        )
    overlap = width == 2 * d
    if tuple(bias.shape) != (m, width):
        raise ValueError(f"bias must be [m, width] = [{m}, {width}], got {tuple(bias.shape)}")
    if cos.shape != sin.shape or cos.shape[0] != n or not 1 <= 2 * cos.shape[1] <= d:
        raise ValueError(
            f"cos and sin must both be [n, rope_dim // 2] with n = {n} and 2 <= rope_dim <= {d}, "
            f"got cos {tuple(cos.shape)}, sin {tuple(sin.shape)}"
        )
    if (prev_kv is None) != (prev_gate is None):
        raise ValueError("prev_kv and prev_gate must be given together or not at all")
    if prev_kv is not None:
        if not overlap:
            raise ValueError("prev_kv / prev_gate only exist for an overlapping compressor (kv width 2 * head_dim)")
        _check_float("prev_kv", prev_kv, 2)
        _check_float("prev_gate", prev_gate, 2)
        if tuple(prev_kv.shape) != (m, d) or tuple(prev_gate.shape) != (m, d):
            raise ValueError(
                f"prev_kv and prev_gate must be [m, head_dim] = [{m}, {d}], "
                f"got {tuple(prev_kv.shape)} and {tuple(prev_gate.shape)}"
            )
    tensors = {"kv": kv, "gate": gate, "bias": bias, "norm_weight": norm_weight, "cos": cos, "sin": sin}
    if prev_kv is not None:
        tensors.update(prev_kv=prev_kv, prev_gate=prev_gate)
    for name, t in tensors.items():
        if t.device != kv.device:
            raise ValueError(f"{name} is on {t.device} but kv is on {kv.device}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    if dtype not in PLAIN_DTYPES:
        raise TypeError(f"dtype must be bfloat16, float16 or float32, got {dtype!r}")
    return CompressShape(n, m, d, 2 * cos.shape[1], overlap, prev_kv is not None)


def check_write_args(pages, page_size, slots, shape: CompressShape, dtype):
    """Validate the cache arguments of `write_compressed`. Returns (format, dtype, slots int64):
    format is Model1Format for FP8 pages, None for plain ones; dtype the rounding dtype."""
    if not isinstance(pages, torch.Tensor):
        raise TypeError(f"pages must be a torch.Tensor, got {type(pages).__name__}")
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
        raise ValueError(f"page_size must be an int >= 1, got {page_size!r}")
    if pages.dtype in (torch.uint8, torch.float8_e4m3fn):
        fmt = Model1Format()
        if (shape.head_dim, shape.rope_dim) != (fmt.head_dim, fmt.rope_dim):
            raise ValueError(
                f"FP8 pages hold Model1Format entries of head_dim {fmt.head_dim} with rope_dim {fmt.rope_dim}, "
                f"got head_dim {shape.head_dim}, rope_dim {shape.rope_dim}"
            )
        want = fmt.page_bytes(page_size)
        if pages.dim() != 2 or pages.shape[1] != want:
            raise ValueError(
                f"pages must be uint8 [num_pages, {want}] (Model1Format, page_size {page_size}), "
                f"got {tuple(pages.shape)}"
            )
        dtype = torch.bfloat16 if dtype is None else dtype
        if dtype not in PLAIN_DTYPES:
            raise TypeError(f"dtype must be bfloat16, float16 or float32, got {dtype!r}")
    elif pages.dtype in PLAIN_DTYPES:
        fmt = None
        if pages.dim() != 4 or tuple(pages.shape[1:]) != (page_size, 1, shape.head_dim):
            raise ValueError(
                f"pages must be [num_pages, page_size, 1, head_dim] = [*, {page_size}, 1, {shape.head_dim}], "
                f"got {tuple(pages.shape)}"
            )
        if dtype is not None and dtype != pages.dtype:
            raise TypeError(f"dtype must be None or pages' dtype {pages.dtype} for plain pages, got {dtype!r}")
        dtype = pages.dtype
    else:
        raise TypeError(f"pages must be uint8 (FP8 Model1Format) or bfloat16 / float16 / float32, got {pages.dtype}")
    slots = _check_slots(slots, pages.shape[0] * page_size, pages.device, distinct=True)
    if slots.shape[0] != shape.n:
        raise ValueError(f"slots must hold one slot per entry ({shape.n}), got {slots.shape[0]}")
    return fmt, dtype, slots


def pool(kv: torch.Tensor, gate: torch.Tensor, position_bias: torch.Tensor, overlap: bool) -> torch.Tensor:
    """The compressor's softmax-gated pooling of whole windows (before its norm and RoPE): the one
    definition, differentiable, any float dtype; `compress` and `mla.v4_attention` call it.

    Args:
        kv, gate: [b, s, c * d] projections of s tokens (c = 2 with `overlap`, else 1).
        position_bias: [m, c * d], added to the gate of the token at offset i of its window.
        overlap: CSA's overlapping windows: entry w pools the first d channels of window w - 1
            and the last d channels of window w (2m slots; window -1 contributes nothing).

    Returns:
        [b, s // m, d] in kv's dtype: entry w = sum over its slots of softmax(gate + bias) * kv
        per channel, computed in at least float32. Tokens past the last whole window are not
        pooled (their entry has not closed).
    """
    b, s, width = kv.shape
    m = position_bias.shape[0]
    n = s // m
    dtype, compute = kv.dtype, torch.promote_types(kv.dtype, torch.float32)
    kv = kv[:, : n * m].to(compute).unflatten(1, (n, m))  # [b, n, m, c * d]
    gate = gate[:, : n * m].to(compute).unflatten(1, (n, m)) + position_bias.to(compute)
    if overlap:
        d = width // 2
        # window w - 1's first half joins entry w; before window 0 there is nothing (weight 0)
        previous_kv = F.pad(kv[..., :d], (0, 0, 0, 0, 1, 0))[:, :n]
        previous_gate = F.pad(gate[..., :d], (0, 0, 0, 0, 1, 0), value=-math.inf)[:, :n]
        kv = torch.cat([previous_kv, kv[..., d:]], dim=2)  # [b, n, 2m, d]
        gate = torch.cat([previous_gate, gate[..., d:]], dim=2)
    return (kv * gate.softmax(dim=2)).sum(dim=2).to(dtype)


def _round(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x (float32) rounded to dtype and back, as DeepSeek's activations are."""
    return x.to(dtype).float()


def _entries(shape: CompressShape, kv, gate, bias, norm_weight, cos, sin, prev_kv, prev_gate, eps, dtype):
    """The entries, float32 [n, head_dim], each rounded to dtype."""
    n, m, d = shape.n, shape.m, shape.head_dim
    values, logits = kv.float().flatten(0, 1)[None], gate.float().flatten(0, 1)[None]  # [1, n * m, W]
    if shape.has_prev:  # the window before kv[0]: only its Ca half (first d channels) is pooled
        width = values.shape[-1]
        values = torch.cat([F.pad(prev_kv.float(), (0, width - d))[None], values], dim=1)
        logits = torch.cat([F.pad(prev_gate.float(), (0, width - d))[None], logits], dim=1)
    pooled = _round(pool(values, logits, bias.float(), shape.overlap)[0, -n:], dtype)  # [n, d]
    normed = pooled * torch.rsqrt(pooled.square().mean(dim=-1, keepdim=True) + eps)
    entry = _round(norm_weight.float() * normed, dtype)
    half = shape.rope_dim // 2
    x0, x1 = entry[:, d - shape.rope_dim :: 2], entry[:, d - shape.rope_dim + 1 :: 2]  # [n, half]
    c, s = cos.float(), sin.float()
    roped = torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).reshape(n, 2 * half)
    return torch.cat([entry[:, : d - shape.rope_dim], _round(roped, dtype)], dim=1)


def compress(
    kv: torch.Tensor,
    gate: torch.Tensor,
    bias: torch.Tensor,
    norm_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    prev_kv: torch.Tensor | None = None,
    prev_gate: torch.Tensor | None = None,
    eps: float = 1e-6,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Compressed entries of n consecutive complete windows of one sequence (module docstring).

    Args:
        kv: [n, m, W] per-token values, window-major (token j of window w at kv[w, j]);
            W = head_dim (HCA) or 2 * head_dim (CSA / indexer: [Ca | Cb]). bf16 / fp16 / fp32.
        gate: [n, m, W] per-token gate logits, without the bias; same dtypes.
        bias: [m, W] per-position gate bias (DeepSeek's `ape`, transformers' `position_bias`).
        norm_weight: [head_dim] RMSNorm weight.
        cos, sin: [n, rope_dim // 2] at each entry's position (its window's first token); the
            last rope_dim channels are roped.
        prev_kv, prev_gate: [m, head_dim] the Ca half (first head_dim channels) of the window
            before kv[0] and its raw gate logits (bias not added), for a CSA continuation;
            None when kv[0] starts the sequence (its Ca slots then weigh 0). HCA: None.
        eps: RMSNorm epsilon (DeepSeek's norm_eps, 1e-6).
        dtype: activation dtype rounded to after pooling, after the norm and after RoPE.

    Returns:
        [n, head_dim] in dtype.
    """
    shape = check_compress_args(kv, gate, bias, norm_weight, cos, sin, prev_kv, prev_gate, eps, dtype)
    return _entries(shape, kv, gate, bias, norm_weight, cos, sin, prev_kv, prev_gate, eps, dtype).to(dtype)


def write_compressed(
    pages: torch.Tensor,
    page_size: int,
    slots: torch.Tensor,
    kv: torch.Tensor,
    gate: torch.Tensor,
    bias: torch.Tensor,
    norm_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    prev_kv: torch.Tensor | None = None,
    prev_gate: torch.Tensor | None = None,
    eps: float = 1e-6,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """`compress`, stored straight into a paged cache, in place.

    Args:
        pages: plain bf16 / fp16 / fp32 [num_pages, page_size, 1, head_dim], or FP8
            `mla.formats.Model1Format` pages uint8 [num_pages, Model1Format().page_bytes(page_size)]
            (head_dim 512, rope_dim 64; quantized on write, as Model1Format.write).
        page_size: tokens per page.
        slots: int32 / int64 [n] distinct slots (page * page_size + row), one per entry.
        kv .. eps: as `compress`.
        dtype: the activation dtype of `compress`. Plain pages: None or pages.dtype. FP8
            pages: default bfloat16 (DeepSeek quantizes its bfloat16 entries).

    Returns:
        pages, modified in place.
    """
    shape = check_compress_args(kv, gate, bias, norm_weight, cos, sin, prev_kv, prev_gate, eps,
                                torch.float32 if dtype is None else dtype)  # fmt: skip
    fmt, dtype, slots = check_write_args(pages, page_size, slots, shape, dtype)
    entries = _entries(shape, kv, gate, bias, norm_weight, cos, sin, prev_kv, prev_gate, eps, dtype)
    if fmt is not None:
        fmt.write(pages.view(torch.uint8), page_size, slots, entries.to(dtype))
    else:
        pages[slots // page_size, slots % page_size, 0] = entries.to(dtype)
    return pages
