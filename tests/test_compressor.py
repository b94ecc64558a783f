"""DeepSeek-V4's token compressor: the reference against transformers' compressor modules, the
kernel against the reference, the cache writes, and argument errors.

The transformers modules (`DeepseekV4HCACompressor`, `DeepseekV4CSACompressor` and its
`DeepseekV4Indexer`) run on a tiny config with their own cache layer, in two calls, so the
second call's first window pools the first call's last window (the overlap state).
"""

from __future__ import annotations

import inspect
import types

import pytest
import torch
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as hf
from transformers.models.deepseek_v4.configuration_deepseek_v4 import DeepseekV4Config

from mla.formats import Model1Format
from mla.kernels import compressor as kcomp
from mla.reference import compressor as rcomp

from .utils import assert_close, randomize_

CSA, HCA = "compressed_sparse_attention", "heavily_compressed_attention"
TINY = dict(
    hidden_size=24,
    head_dim=32,
    qk_rope_head_dim=8,
    num_attention_heads=2,
    q_lora_rank=16,
    index_head_dim=16,
    index_n_heads=2,
    compress_rates={CSA: 4, HCA: 8},
    num_hidden_layers=2,
    layer_types=[CSA, HCA],
    max_position_embeddings=1024,
    rope_parameters={"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 64},
)
COMPRESSES = {"triton": kcomp.compress, "reference": rcomp.compress}
WRITES = {"triton": kcomp.write_compressed, "reference": rcomp.write_compressed}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ROUNDING = {torch.float32: 2e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}
"""Relative error allowed between the twins: float32 rounding, or one step of the activation
dtype, since a float32 difference of one ulp can round to neighbouring bfloat16 / float16
values at any of the three rounding points."""


def hf_module(kind: str, dtype: torch.dtype, seed: int):
    """(compressor module, the module holding kv_proj / gate_proj / position_bias / kv_norm,
    cache entry name, cache layer) for kind "hca", "csa" or "indexer"."""
    config = DeepseekV4Config(**TINY)
    module = hf.DeepseekV4HCACompressor(config) if kind == "hca" else hf.DeepseekV4CSACompressor(config)
    randomize_(module.to(dtype), seed)
    layer = hf.DeepseekV4HCACache(config) if kind == "hca" else hf.DeepseekV4CSACache(config)
    inner = module.indexer if kind == "indexer" else module
    return module, inner, "indexer" if kind == "indexer" else "compressor", layer


def hf_entries(module, name, layer, hidden, q_residual, start):
    """Entries the module's cache layer holds after one call on hidden [1, s, hidden_size]."""
    positions = torch.arange(start, start + hidden.shape[1])[None]
    module(hidden, q_residual, positions, types.SimpleNamespace(layers=[layer]), 0)
    entries = layer.compressed_kv[name]
    return entries.reshape(-1, entries.shape[-1])


def windows(inner, hidden, first: int, last: int):
    """Our arguments for windows first..last-1 of the token projections of hidden [1, s, h]."""
    m = inner.position_bias.shape[0]
    kv = inner.kv_proj(hidden)[0].float()
    gate = inner.gate_proj(hidden)[0].float()
    positions = torch.arange(first, last) * m
    cos, sin = inner.rotary_emb(kv, position_ids=positions[None], layer_type="compress")
    args = dict(
        kv=kv[first * m : last * m].reshape(last - first, m, -1),
        gate=gate[first * m : last * m].reshape(last - first, m, -1),
        bias=inner.position_bias.float(),
        norm_weight=inner.kv_norm.weight.float(),
        cos=cos[0].float(),
        sin=sin[0].float(),
        eps=inner.kv_norm.variance_epsilon,
    )
    d = inner.kv_norm.weight.shape[0]
    if first > 0 and kv.shape[-1] == 2 * d:
        args.update(prev_kv=kv[(first - 1) * m : first * m, :d], prev_gate=gate[(first - 1) * m : first * m, :d])
    return args


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("kind", ["hca", "csa", "indexer"])
def test_reference_matches_transformers(kind, dtype, one_thread):
    """Two calls of 19 and 14 tokens: entries 0..n1-1 from the first, the rest from the second,
    whose first window (and, for CSA, its Ca slots from the first call) spans both."""
    module, inner, name, layer = hf_module(kind, dtype, seed=1)
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(1, 33, TINY["hidden_size"], generator=g, dtype=dtype)
    q_residual = torch.randn(1, 33, TINY["q_lora_rank"], generator=g, dtype=dtype)
    m = inner.position_bias.shape[0]
    cut = 19
    with torch.no_grad():
        first = hf_entries(module, name, layer, hidden[:, :cut], q_residual[:, :cut], 0)
        both = hf_entries(module, name, layer, hidden[:, cut:], q_residual[:, cut:], cut)
        n1, n2 = cut // m, 33 // m
        assert first.shape[0] == n1 and both.shape[0] == n2
        ours_first = rcomp.compress(**windows(inner, hidden, 0, n1))
        ours_second = rcomp.compress(**windows(inner, hidden, n1, n2))
    assert_close(f"{kind} first call", ours_first, first.float(), atol=2e-5, rtol=2e-5)
    assert_close(f"{kind} second call", ours_second, both[n1:].float(), atol=2e-5, rtol=2e-5)


def random_args(n, m, d, rope_dim, overlap, prev, seed, dtype=torch.float32):
    """Adversarial-enough inputs: gate logits of scale 3 (softmax far from uniform), values
    with a channel offset, norm weights away from 1."""
    g = torch.Generator().manual_seed(seed)
    width = 2 * d if overlap else d

    def randn(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=g)

    angle = randn(n, rope_dim // 2, scale=3.0)
    args = dict(
        kv=(randn(n, m, width) + randn(width, scale=0.5)).to(dtype),
        gate=randn(n, m, width, scale=3.0).to(dtype),
        bias=randn(m, width),
        norm_weight=1 + 0.3 * randn(d),
        cos=angle.cos(),
        sin=angle.sin(),
    )
    if prev:
        args.update(prev_kv=randn(m, d).to(dtype), prev_gate=randn(m, d, scale=3.0).to(dtype))
    return args


def test_reference_overlap_first_window_ignores_missing_half():
    """Without prev, the first CSA entry is the pooling of its Cb half alone; with prev, the
    later entries are those of one longer call (consecutive windows share Ca)."""
    args = random_args(3, 4, 16, 8, overlap=True, prev=False, seed=3)
    full = rcomp.compress(**args)
    d = 16
    alone = dict(args, kv=args["kv"][:1, :, d:], gate=args["gate"][:1, :, d:], bias=args["bias"][:, d:],
                 cos=args["cos"][:1], sin=args["sin"][:1])  # fmt: skip
    assert_close("first entry", full[:1], rcomp.compress(**alone), atol=1e-6)
    rest = dict(args, kv=args["kv"][1:], gate=args["gate"][1:], cos=args["cos"][1:], sin=args["sin"][1:],
                prev_kv=args["kv"][0, :, :d], prev_gate=args["gate"][0, :, :d])  # fmt: skip
    assert_close("continuation", full[1:], rcomp.compress(**rest), atol=1e-6)


@pytest.mark.parametrize("name", ["compress", "write_compressed"])
def test_twins_share_signatures(name):
    assert inspect.signature(getattr(kcomp, name)) == inspect.signature(getattr(rcomp, name))


def good_call():
    return random_args(2, 4, 16, 8, overlap=True, prev=True, seed=4)


BAD_ARGS = [
    pytest.param(dict(kv=torch.zeros(2, 4, 32, dtype=torch.int32)), TypeError, "kv must be bfloat16", id="kv-int"),
    pytest.param(dict(kv=torch.zeros(8, 32)), ValueError, "kv must have 3 dimensions", id="kv-2d"),
    pytest.param(dict(gate=torch.zeros(2, 4, 30)), ValueError, "gate .* must have kv's shape", id="gate-shape"),
    pytest.param(dict(norm_weight=torch.ones(12)), ValueError, "head_dim = 12", id="width-not-d-or-2d"),
    pytest.param(dict(bias=torch.zeros(4, 16)), ValueError, r"bias must be \[m, width\]", id="bias-shape"),
    pytest.param(dict(cos=torch.zeros(3, 4)), ValueError, "cos and sin", id="cos-rows"),
    pytest.param(dict(cos=torch.zeros(2, 9), sin=torch.zeros(2, 9)), ValueError, "rope_dim <= 16", id="rope-wide"),
    pytest.param(dict(prev_gate=None), ValueError, "prev_kv and prev_gate", id="prev-half"),
    pytest.param(dict(prev_kv=torch.zeros(4, 32)), ValueError, r"prev_kv and prev_gate must be \[m, head_dim\]",
                 id="prev-shape"),  # fmt: skip
    pytest.param(dict(eps=0.0), ValueError, "eps must be a positive", id="eps-zero"),
    pytest.param(dict(dtype=torch.float64), TypeError, "dtype must be", id="dtype-fp64"),
]


@pytest.mark.parametrize("twin", list(COMPRESSES))
@pytest.mark.parametrize("change, error, match", BAD_ARGS)
def test_bad_arguments(twin, change, error, match):
    with pytest.raises(error, match=match):
        COMPRESSES[twin](**{**good_call(), **change})


def test_bad_prev_without_overlap():
    args = random_args(2, 4, 16, 8, overlap=False, prev=False, seed=5)
    for compress in COMPRESSES.values():
        with pytest.raises(ValueError, match="only exist for an overlapping"):
            compress(**args, prev_kv=torch.zeros(4, 16), prev_gate=torch.zeros(4, 16))


BAD_PAGES = [
    pytest.param(lambda: torch.zeros(2, 4, 1, 16, dtype=torch.int32), 4, TypeError, "pages must be uint8", id="int"),
    pytest.param(lambda: torch.zeros(2, 4, 1, 8), 4, ValueError, "pages must be", id="plain-width"),
    pytest.param(lambda: torch.zeros(2, 4, 1, 16), 0, ValueError, "page_size must be", id="page-size-0"),
    pytest.param(lambda: Model1Format().allocate(2, 4, "cpu"), 4, ValueError, "FP8 pages hold Model1Format",
                 id="fp8-head-dim"),  # fmt: skip
]


@pytest.mark.parametrize("twin", list(WRITES))
@pytest.mark.parametrize("make, page_size, error, match", BAD_PAGES)
def test_bad_pages(twin, make, page_size, error, match):
    with pytest.raises(error, match=match):
        WRITES[twin](make(), page_size, torch.tensor([0, 5]), **good_call())


@pytest.mark.parametrize("twin", list(WRITES))
def test_bad_slots(twin):
    pages = torch.zeros(2, 4, 1, 16)
    with pytest.raises(ValueError, match="one slot per entry"):
        WRITES[twin](pages, 4, torch.tensor([1, 2, 3]), **good_call())
    with pytest.raises(ValueError, match="distinct"):
        WRITES[twin](pages, 4, torch.tensor([1, 1]), **good_call())


def test_reference_writes_plain_and_fp8_pages():
    """Plain pages get the entries in the pages' dtype at their slots and nothing else; FP8
    pages get Model1Format.write of the bfloat16 entries, byte for byte."""
    args = random_args(3, 4, 512, 64, overlap=True, prev=True, seed=6)
    slots = torch.tensor([9, 2, 4])
    pages = torch.full((3, 4, 1, 512), 7.0, dtype=torch.bfloat16)
    rcomp.write_compressed(pages, 4, slots, **args)
    expected = torch.full_like(pages, 7.0)
    expected.view(-1, 512)[slots] = rcomp.compress(**args, dtype=torch.bfloat16)
    assert torch.equal(pages, expected)

    fmt = Model1Format()
    pages = fmt.allocate(3, 4, "cpu").random_(0, 256)
    expected = pages.clone()
    fmt.write(expected, 4, slots, rcomp.compress(**args, dtype=torch.bfloat16))
    rcomp.write_compressed(pages, 4, slots, **args)
    assert torch.equal(pages, expected)


KERNEL_CASES = [
    pytest.param(3, 8, 32, 8, False, False, "fp32", "fp32", id="hca-m8-d32-r8-fp32"),
    pytest.param(2, 16, 64, 16, False, False, "bf16", "bf16", id="hca-m16-d64-r16-bf16-two-blocks"),
    pytest.param(5, 4, 32, 8, True, False, "fp32", "fp32", id="csa-m4-d32-r8-first"),
    pytest.param(3, 4, 48, 16, True, True, "fp16", "fp16", id="csa-m4-d48-r16-prev-fp16"),
    pytest.param(3, 4, 16, 8, True, True, "bf16", "fp32", id="indexer-m4-d16-r8-prev-bf16-in"),
    pytest.param(2, 3, 20, 20, True, True, "fp32", "bf16", id="csa-m3-d20-all-roped-bf16-out"),
    pytest.param(0, 4, 32, 8, True, False, "fp32", "fp32", id="empty"),
]


@pytest.mark.parametrize("n, m, d, rope_dim, overlap, prev, in_dtype, dtype", KERNEL_CASES)
def test_kernel_matches_reference(n, m, d, rope_dim, overlap, prev, in_dtype, dtype, nan_empty):
    args = random_args(n, m, d, rope_dim, overlap, prev, seed=7, dtype=DTYPES[in_dtype])
    if n:  # strided views: every window and the gate transposed in memory
        args["gate"] = args["gate"].transpose(0, 1).contiguous().transpose(0, 1)
        args["kv"] = torch.cat([args["kv"], args["kv"]], dim=-1)[..., : args["kv"].shape[-1]]
    expected = rcomp.compress(**args, dtype=DTYPES[dtype])
    actual = kcomp.compress(**args, dtype=DTYPES[dtype])
    assert actual.dtype == expected.dtype and actual.shape == (n, d)
    tol = ROUNDING[DTYPES[dtype]]
    assert_close(f"entries {in_dtype} -> {dtype}", actual.float(), expected.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_kernel_writes_plain_pages(dtype):
    """Written rows as the reference's, within the dtype's step; every other row untouched,
    in pages with a spare row (page stride is not page_size rows)."""
    args = random_args(4, 4, 32, 8, overlap=True, prev=True, seed=8)
    slots = torch.tensor([13, 0, 6, 7])
    g = torch.Generator().manual_seed(9)
    base = torch.randn(4, 5, 1, 32, generator=g).to(DTYPES[dtype])[:, :4]
    actual, expected = base.clone(), base.clone()
    kcomp.write_compressed(actual, 4, slots, **args)
    rcomp.write_compressed(expected, 4, slots, **args)
    written = torch.zeros(16, dtype=torch.bool)
    written[slots] = True
    flat_actual, flat_expected = actual.reshape(16, 32), expected.reshape(16, 32)
    assert torch.equal(flat_actual[~written], flat_expected[~written])
    tol = ROUNDING[DTYPES[dtype]]
    assert_close("written rows", flat_actual[slots].float(), flat_expected[slots].float(), atol=tol, rtol=tol)


def fp8_case(seed, n=5):
    return random_args(n, 4, 512, 64, overlap=True, prev=True, seed=seed), torch.randperm(
        12, generator=torch.Generator().manual_seed(seed))[:n]  # fmt: skip


def test_kernel_fp8_pages_are_model1_bytes():
    """The kernel's FP8 bytes are Model1Format's of the kernel's own bfloat16 entries, byte for
    byte over the whole pages (quantization is exact integer arithmetic; only the float
    pipeline before it may round differently from the reference)."""
    fmt = Model1Format()
    args, slots = fp8_case(10)
    pages = fmt.allocate(3, 4, "cpu").random_(0, 256, generator=torch.Generator().manual_seed(11))
    expected = pages.clone()
    fmt.write(expected, 4, slots, kcomp.compress(**args, dtype=torch.bfloat16))
    kcomp.write_compressed(pages, 4, slots, **args)
    assert torch.equal(pages, expected)


def test_kernel_fp8_pages_match_reference():
    """Against the reference's pages: the entries read back within one e4m3 step (relative
    2 ** -3), for a code whose bfloat16 input rounded the other way (with these inputs the
    pages are in fact byte-identical; untouched bytes: the test above)."""
    fmt = Model1Format()
    args, slots = fp8_case(12)
    actual = fmt.allocate(3, 4, "cpu")
    expected = fmt.allocate(3, 4, "cpu")
    kcomp.write_compressed(actual, 4, slots, **args)
    rcomp.write_compressed(expected, 4, slots, **args)
    values = fmt.read(actual, 4, slots)
    assert_close("fp8 entries", values, fmt.read(expected, 4, slots), atol=2**-9 * 2**-5, rtol=2**-3)


def deepseek_rope(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """DeepSeek's `apply_rotary_emb` as math: adjacent channel pairs are complex numbers
    multiplied by exp(i * angle) in float32, the result stored back in x's dtype."""
    z = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(z * torch.polar(torch.ones_like(angle), angle)).flatten(-2).to(x.dtype)


def deepseek_entry(values, logits, weight, angle, eps):
    """One entry the way DeepSeek's Compressor finishes it (float32 pooling, the sum rounded
    to bfloat16, RMSNorm in float32 rounded to bfloat16, RoPE on the last channels)."""
    pooled = (values * logits.softmax(dim=0)).sum(dim=0).to(torch.bfloat16).float()
    normed = (weight * (pooled * torch.rsqrt(pooled.square().mean() + eps))).to(torch.bfloat16)
    rope = angle.shape[0] * 2
    return torch.cat([normed[:-rope], deepseek_rope(normed[-rope:], angle)])


@pytest.mark.parametrize("overlap", [True, False], ids=["csa-m4", "hca-m4"])
def test_reference_matches_deepseek_decode_state(overlap):
    """DeepSeek's decode keeps the raw float32 kv and logits (bias added) of the open windows
    and emits entry w when token w * m + m - 1 arrives, roped at position w * m. Replayed
    token by token here, its entries equal `compress(..., dtype=bfloat16)` of the windows bit for
    bit: the same float32 operations round to bfloat16 at the same points (a rounding point
    dropped from the reference fails this test)."""
    m, d, rope, tokens = 4, 32, 8, 18
    g = torch.Generator().manual_seed(13)
    width = 2 * d if overlap else d
    kv, gate = torch.randn(tokens, width, generator=g), 3 * torch.randn(tokens, width, generator=g)
    bias, weight = torch.randn(m, width, generator=g), 1 + 0.3 * torch.randn(d, generator=g)
    angles = 0.1 * torch.arange(tokens)[:, None] * torch.arange(1, rope // 2 + 1)  # [pos, rope // 2]
    previous = None  # the last closed window's rows (CSA: their first d channels are Ca)
    emitted = {}
    for pos in range(tokens):
        if (pos + 1) % m:
            continue
        rows = slice(pos + 1 - m, pos + 1)
        values, logits = kv[rows], gate[rows] + bias
        if overlap:
            values, logits = values[:, d:], logits[:, d:]
        if overlap and previous is not None:
            values = torch.cat([kv[previous, :d], values])
            logits = torch.cat([(gate[previous] + bias)[:, :d], logits])
        emitted[pos] = deepseek_entry(values, logits, weight, angles[pos + 1 - m], 1e-6)
        previous = rows
    n = tokens // m
    assert sorted(emitted) == [w * m + m - 1 for w in range(n)]
    ours = rcomp.compress(kv[: n * m].reshape(n, m, width), gate[: n * m].reshape(n, m, width), bias, weight,
                          angles[::m][:n].cos(), angles[::m][:n].sin(), dtype=torch.bfloat16)  # fmt: skip
    assert_close("entries", ours.float(), torch.stack(list(emitted.values())).float(), atol=0, rtol=0)
