"""Decode over DeepSeek-V4's FP8 "MODEL1" pages (`mla.formats.Model1Format`, FlashMLA's
`FP8KVCacheLayout.MODEL1_FP8Sparse`): K = V, d = head_dim_v = 512, tokens located by the page
layout, not by the k_cache view's row stride.

The chain of proof: the reference over MODEL1 pages is the reference over plain float32 pages
holding `Model1Format.read`'s values (so it reads the bytes as the format does), and the kernel
matches that reference. Every slot no read entry names holds a NaN-poisoned token (scale byte
0xFF), so a key read by mistake shows in the output."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mla import kernels, reference
from mla.conformance import FACTOR, FLOOR
from mla.conformance.cases import SINKS
from mla.formats import Fp8Format, Model1Format, decode_format

from .test_decode_contract import assert_same_error, outcome
from .utils import assert_close, max_error

pytestmark = pytest.mark.usefixtures("one_thread")

FMT = Model1Format()
D = FMT.head_dim
I32 = torch.int32


@dataclasses.dataclass(frozen=True)
class M1Case:
    """A MODEL1 decode call: sparse (topk entries per token, with -1 holes) or dense (block
    table, lengths `lens`); optionally an extra cache of x_pages pages of x_page tokens with
    x_topk entries per token; per-row lengths, a sink per head, ragged query counts."""

    b: int
    s_q: int
    h_q: int
    page: int
    pages: int
    topk: int | None = None
    topk_length: tuple[int, ...] | None = None
    lens: tuple[int, ...] | None = None
    causal: bool = False
    x_page: int | None = None
    x_pages: int = 0
    x_topk: int = 0
    x_topk_length: tuple[int, ...] | None = None
    sink: bool = False
    seqlens_q: tuple[int, ...] | None = None
    dtype: torch.dtype = torch.float32
    num_sm: int | None = None
    seed: int = 0

    @property
    def id(self) -> str:
        kind = f"topk{self.topk}" if self.topk else f"dense{'-causal' if self.causal else ''}"
        parts = [f"b{self.b}-sq{self.s_q}-h{self.h_q}-page{self.page}-{kind}"]
        parts += [f"extra-page{self.x_page}-topk{self.x_topk}"] * bool(self.x_page)
        parts += ["sink"] * self.sink + ["ragged"] * bool(self.seqlens_q) + [f"sm{self.num_sm}"] * bool(self.num_sm)
        return "-".join(parts + [str(self.dtype).removeprefix("torch.")])


def _tokens(g, n: int) -> torch.Tensor:
    """[n, 512] values whose 64-channel tiles span magnitudes 2^-3 .. 2^3, so the tokens' scales
    differ (wider, and the largest scores test float32 rounding of the softmax, not the reads)."""
    exponent = torch.randint(-3, 4, (n, D // FMT.tile, 1), generator=g)
    return (torch.randn(n, D // FMT.tile, FMT.tile, generator=g) * 2.0**exponent).view(n, D)


def _pages(g, num_pages: int, page: int, read: torch.Tensor) -> torch.Tensor:
    """MODEL1 pages uint8 [num_pages, page_bytes]: the slots in `read` hold tokens, the others NaN."""
    pages = FMT.allocate(num_pages, page, "cpu")
    values = _tokens(g, num_pages * page)
    poisoned = torch.ones(num_pages * page, dtype=torch.bool)
    poisoned[read.long()] = False
    values[poisoned] = float("nan")
    FMT.write(pages, page, torch.arange(num_pages * page), values)
    return pages


def _slot_lists(g, b, s_q, topk, num_slots, length, seqlens_q):
    """indices [b, s_q, topk] with -1 holes, and the slots the call reads (entries below the
    row's length of real query tokens); entries past a length point anywhere in the cache."""
    indices = torch.randint(0, num_slots, (b, s_q, topk), generator=g, dtype=I32)
    indices[torch.rand(b, s_q, topk, generator=g) < 0.2] = -1
    limit = torch.tensor(length if length else [topk] * b)
    n_q = torch.tensor(seqlens_q if seqlens_q else [s_q] * b)
    used = (torch.arange(topk) < limit[:, None, None]) & (torch.arange(s_q)[:, None] < n_q[:, None, None])
    read = indices[used & (indices >= 0)]
    return indices, read, None if length is None else torch.tensor(length, dtype=I32)


def build(case: M1Case):
    """(kwargs of flash_mla_with_kvcache, the MODEL1 pages, the extra pages or None)."""
    g = torch.Generator().manual_seed(case.seed)
    q = torch.randn(case.b, case.s_q, case.h_q, D, generator=g).to(case.dtype)
    seqlens_q = None if case.seqlens_q is None else torch.tensor(case.seqlens_q, dtype=I32)
    kw = dict(q=q, head_dim_v=D, is_fp8_kvcache=True, seqlens_q=seqlens_q, causal=case.causal)
    if case.topk:
        kw["indices"], read, kw["topk_length"] = _slot_lists(
            g, case.b, case.s_q, case.topk, case.pages * case.page, case.topk_length, case.seqlens_q
        )
        kw.update(block_table=None, cache_seqlens=None)
    else:
        # a shuffled block table
        lens = torch.tensor(case.lens, dtype=I32)
        width = max(1, -(-max(case.lens) // case.page))
        table = torch.randperm(case.pages, generator=g)[: case.b * width].view(case.b, width).to(I32)
        position = torch.arange(width * case.page)
        used = position < lens[:, None]
        read = (table[:, position // case.page] * case.page + position % case.page)[used]
        kw.update(block_table=table, cache_seqlens=lens)
    pages = _pages(g, case.pages, case.page, read)
    kw["k_cache"] = FMT.kvcache_view(pages, case.page)
    x_pages = None
    if case.x_page:
        kw["extra_indices_in_kvcache"], x_read, kw["extra_topk_length"] = _slot_lists(
            g, case.b, case.s_q, case.x_topk, case.x_pages * case.x_page, case.x_topk_length, case.seqlens_q
        )
        x_pages = _pages(g, case.x_pages, case.x_page, x_read)
        kw["extra_k_cache"] = FMT.kvcache_view(x_pages, case.x_page)
    if case.sink:
        kw["attn_sink"] = torch.tensor([SINKS[h % len(SINKS)] for h in range(case.h_q)], dtype=torch.float32)
    return kw, pages, x_pages


def plain(pages: torch.Tensor, page: int) -> torch.Tensor:
    """float32 pages [num_pages, page, 1, 512] of the values `Model1Format.read` gives."""
    num_pages = pages.shape[0]
    return FMT.read(pages, page, torch.arange(num_pages * page)).view(num_pages, page, 1, D)


CASES = [
    M1Case(2, 2, 1, 5, 7, topk=70, topk_length=(70, 23), seed=1),
    M1Case(3, 2, 16, 3, 9, topk=24, topk_length=(24, 5, 0), x_page=2, x_pages=8, x_topk=9,
           x_topk_length=(9, 0, 4), sink=True, seqlens_q=(2, 0, 1), seed=2),
    M1Case(2, 1, 16, 64, 12, topk=200, x_page=4, x_pages=30, x_topk=100, sink=True, num_sm=64, seed=3),
    M1Case(2, 2, 3, 7, 8, lens=(23, 2), causal=True, seqlens_q=(2, 1), seed=4),
    M1Case(2, 1, 16, 64, 6, lens=(130, 64), x_page=3, x_pages=5, x_topk=6, sink=True, seed=5),
    M1Case(2, 1, 16, 5, 9, topk=40, topk_length=(40, 11), x_page=64, x_pages=2, x_topk=30, sink=True,
           dtype=torch.bfloat16, seed=6),
]  # fmt: skip


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_reference_reads_model1_as_plain_pages_of_its_values(case):
    """MODEL1 reference == plain-row reference over float32 pages of `Model1Format.read`'s
    values, to float32 rounding (q float32: the dequantized values are the same numbers)."""
    kw, pages, x_pages = build(dataclasses.replace(case, dtype=torch.float32))
    rows = dict(kw, is_fp8_kvcache=False, k_cache=plain(pages, case.page))
    if x_pages is not None:
        rows["extra_k_cache"] = plain(x_pages, case.x_page)
    out, lse = reference.flash_mla_with_kvcache(**kw)
    out_rows, lse_rows = reference.flash_mla_with_kvcache(**rows)
    assert_close("out", out, out_rows, atol=1e-6)
    assert_close("lse", lse, lse_rows, atol=1e-6)
    assert not out.isnan().any()


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_kernel_matches_reference(nan_empty, case):
    """The kernel under the tolerance rule of the suite: at most FACTOR times PyTorch's own
    error in q's dtype (plus FLOOR) from the float64 reference. The same call with k_cache as
    float8_e4m3fn (FlashMLA's form) gives the identical result."""
    kw, _, _ = build(case)
    meta, _ = kernels.get_mla_metadata(num_sm=case.num_sm)
    out, lse = kernels.flash_mla_with_kvcache(**kw, tile_scheduler_metadata=meta)
    expected = reference.flash_mla_with_kvcache(**kw, compute_dtype=torch.float64)
    low = reference.flash_mla_with_kvcache(**kw, compute_dtype=case.dtype)
    assert out.dtype == case.dtype and out.shape == (case.b, case.s_q, case.h_q, D)
    for name, got, want, rough in zip(("out", "lse"), (out, lse), expected, low):
        assert_close(name, got, want, atol=FACTOR * max_error(rough, want) + FLOOR)
    if case.num_sm:
        assert (meta.num_splits[1:] - meta.num_splits[:-1]).max() >= 2, "the schedule did not split as intended"
    if case.seqlens_q:
        padding = torch.arange(case.s_q)[None, :] >= torch.tensor(case.seqlens_q)[:, None]
        assert torch.equal(out[padding], torch.zeros_like(out[padding]))
    as_fp8 = dict(kw, k_cache=kw["k_cache"].view(torch.float8_e4m3fn))
    if "extra_k_cache" in kw:
        as_fp8["extra_k_cache"] = kw["extra_k_cache"].view(torch.float8_e4m3fn)
    again = kernels.flash_mla_with_kvcache(**as_fp8, tile_scheduler_metadata=meta)
    assert torch.equal(again[0], out) and torch.equal(again[1], lse)


@pytest.mark.parametrize("arch", [80, 89, 90], ids=lambda a: f"sm{a}")
def test_kernel_cut_as_on_a_gpu_matches_reference(monkeypatch, nan_empty, arch):
    """The launch cut for sm_<arch> (`decode_tiles(..., model1=True)`: 16 query rows per
    program below sm_90, 64 on sm_90, 16 keys per block, so the page of 3 tokens and the extra
    page of 2 cross blocks; sm_80 decodes the codes with integer ops), under the interpreter."""
    from mla.kernels import decode as kdecode

    monkeypatch.setattr(kdecode, "_target_arch", lambda: arch)
    case = CASES[1]
    kw, _, _ = build(case)
    out, lse = kernels.flash_mla_with_kvcache(**kw)
    expected = reference.flash_mla_with_kvcache(**kw, compute_dtype=torch.float64)
    low = reference.flash_mla_with_kvcache(**kw)
    for name, got, want, rough in zip(("out", "lse"), (out, lse), expected, low):
        assert_close(name, got, want, atol=FACTOR * max_error(rough, want) + FLOOR)
    assert kdecode.decode_tiles(case.h_q, True, arch, model1=True).block_m == (64 if arch >= 90 else 16)


def test_page_stride_larger_than_a_page_is_read_by_the_layout():
    """A layer's pages inside a wider allocation ([num_pages, layers * page_bytes], stride(0) >
    page_bytes): the same result as the layer's own pages."""
    kw, pages, _ = build(CASES[0])
    wide = torch.full((pages.shape[0], 3 * pages.shape[1]), 0xFF, dtype=torch.uint8)
    wide[:, pages.shape[1] : 2 * pages.shape[1]] = pages
    layer = FMT.kvcache_view(pages, CASES[0].page)
    strided = wide[:, pages.shape[1] :].as_strided(layer.shape, (wide.stride(0), *layer.stride()[1:]))
    for impl in (kernels, reference):
        base = impl.flash_mla_with_kvcache(**kw)
        got = impl.flash_mla_with_kvcache(**dict(kw, k_cache=strided))
        assert torch.equal(got[0], base[0]) and torch.equal(got[1], base[1])


def test_format_choice():
    """FP8 with d = head_dim_v = 512 over 584-byte tokens is MODEL1; V3's FP8 row stays V3's."""
    view = FMT.kvcache_view(FMT.allocate(2, 4, "cpu"), 4)
    assert isinstance(decode_format(view, 512, 512, True), Model1Format)
    v3 = torch.zeros(2, 4, 1, Fp8Format(512, 64).row_width, dtype=torch.uint8)
    assert isinstance(decode_format(v3, 512, 576, True), Fp8Format)
    with pytest.raises(ValueError, match="head_dim_v must be 512"):
        decode_format(view, 448, 512, True)


def _mutations():
    page = CASES[1].page

    def contiguous(a):  # stride(0) = page * 584 < page_bytes
        a["k_cache"] = a["k_cache"].contiguous()

    def two_heads(a):
        a["k_cache"] = a["k_cache"].expand(-1, -1, 2, -1)

    def strided_bytes(a):
        wide = torch.zeros(a["k_cache"].shape[0], page, 1, 2 * FMT.row_width, dtype=torch.uint8)
        a["k_cache"] = wide[..., ::2]

    def extra_contiguous(a):
        a["extra_k_cache"] = a["extra_k_cache"].contiguous()

    def extra_plain(a):
        a["extra_k_cache"] = torch.zeros(8, 2, 1, D)

    def v3_query(a):
        a["q"] = torch.nn.functional.pad(a["q"], (0, 64))

    return [
        pytest.param(contiguous, ValueError, rf"k_cache .*stride\(0\).*>= page_bytes = {FMT.page_bytes(page)}",
                     id="page-stride"),  # fmt: skip
        pytest.param(two_heads, ValueError, "k_cache .*h_kv must be 1", id="h_kv"),
        pytest.param(lambda a: a.update(head_dim_v=448), ValueError, "head_dim_v=448 .*must be 512", id="head_dim_v"),
        pytest.param(strided_bytes, ValueError, r"k_cache .*stride\(-1\) = 1", id="last-dim-strided"),
        pytest.param(extra_contiguous, ValueError, r"extra_k_cache .*stride\(0\)", id="extra-page-stride"),
        pytest.param(extra_plain, TypeError, "extra_k_cache must be uint8 or float8_e4m3fn", id="extra-format"),
        pytest.param(v3_query, ValueError, r"k_cache must be \[num_pages, page_size, h_kv, 656\]", id="d576"),
        pytest.param(lambda a: a.update(head_dim_v=512, is_fp8_kvcache=False), TypeError, "is_fp8_kvcache=False",
                     id="no-fp8-flag"),
    ]  # fmt: skip


@pytest.mark.parametrize("mutate,error,match", _mutations())
def test_bad_model1_input_raises_the_same_error_in_both(mutate, error, match):
    kw, _, _ = build(CASES[1])
    assert outcome(kernels.flash_mla_with_kvcache, kw) == (None, None)
    mutate(kw)
    assert_same_error(kw, error, match)


def test_unread_tokens_may_hold_anything_and_a_read_nan_shows():
    """Poisoned tokens (NaN scales, NaN rope) that no read entry names never reach the output,
    in either implementation; poisoning one tile of a token that is read makes exactly the
    query tokens that read it NaN."""
    case = CASES[1]
    kw, pages, _ = build(case)
    for impl in (kernels, reference):
        out, lse = impl.flash_mla_with_kvcache(**kw)
        assert not out.isnan().any() and not lse.isnan().any()
    indices = kw["indices"]
    slot = int(indices[0, 0, 0])
    assert slot >= 0
    used = (torch.arange(case.topk) < kw["topk_length"][:, None, None]) & (
        torch.arange(case.s_q)[:, None] < kw["seqlens_q"][:, None, None]
    )
    reads = ((indices == slot) & used).any(-1)  # [b, s_q]
    _, scale_at = FMT._offsets(case.page, torch.tensor([slot]))
    pages.view(-1)[scale_at + 1] = 0xFF  # the token's tile 1: NaN
    for impl in (kernels, reference):
        out, _ = impl.flash_mla_with_kvcache(**kw)
        assert torch.equal(out.isnan().all(-1).all(-1), reads) and torch.equal(out.isnan().any(-1).any(-1), reads)
