"""bench.mxfp4 (section 6 of `python -m bench --full`): the MXFP4-entry simulation rounds what it
should, its counts are consistent, its MODEL1 twin gives the real FP8 cache's logits exactly,
and its bytes are section 1's accounting."""

from __future__ import annotations

import pytest
import torch

from bench import memory, mxfp4, report
from mla.formats import Model1Format, Mxfp4EntryFormat, Mxfp4KeyFormat

pytestmark = pytest.mark.usefixtures("one_thread")

NEW = 4
PROMPTS = 2


@pytest.fixture(scope="module")
def small_report():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return mxfp4.mxfp4_report(prompts=PROMPTS, models=2, new_tokens=NEW, lengths=(12, 20))
    finally:
        torch.set_num_threads(threads)


def test_rounded_cache_stores_what_the_formats_give_back():
    """kv through MODEL1, entries through MXFP4 (368 B rows), index keys through MXFP4 keys, raw
    rows in bfloat16; tiles far from 1 both ways."""
    config = mxfp4.tiny_v4_config(0)  # layers: sliding, CSA, HCA, CSA
    cache = mxfp4.RoundedV4Cache(config, num_pages=2, page_size=8, max_rollback=0, kv=Model1Format(),
                                 entries=Mxfp4EntryFormat(), index_keys=True, raw_dtype=torch.bfloat16)  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(5, 512, generator=generator) * torch.logspace(-3, 3, 5)[:, None]
    slots = torch.tensor([3, 0, 9, 4, 1])
    expected = {
        "kv": Model1Format().unpack(*Model1Format().pack(rows)),
        "entries": Mxfp4EntryFormat().unpack(Mxfp4EntryFormat().pack(rows)),
    }
    for name, want in expected.items():
        cache.write(1, name, slots, rows)
        got = cache.read(1, name, slots)
        assert got.dtype == torch.float32 and torch.equal(got, want), name
    assert not torch.equal(expected["kv"], expected["entries"])  # the two formats round differently
    keys = torch.randn(5, config.index_head_dim, generator=generator)
    cache.write(1, "index_keys", slots, keys)
    fp4 = Mxfp4KeyFormat(config.index_head_dim)
    assert torch.equal(cache.read(1, "index_keys", slots)[:, 0], fp4.unpack(fp4.pack(keys)))
    assert cache.layers[1].raw.dtype == cache.layers[1].index_raw.dtype == torch.bfloat16
    plain = mxfp4.RoundedV4Cache(config, num_pages=2, page_size=8, entries=Mxfp4EntryFormat())
    plain.write(1, "kv", slots, rows)
    plain.write(1, "index_keys", slots, keys)
    assert torch.equal(plain.read(1, "kv", slots), rows) and torch.equal(plain.read(1, "index_keys", slots)[:, 0], keys)
    assert plain.layers[1].raw.dtype == torch.float32


def test_counts_are_consistent(small_report):
    rows = {r["cache"]: r for r in small_report["rows"]}
    assert list(rows) == list(mxfp4.CACHES)
    for row in rows.values():
        assert row["prompts"] == PROMPTS
        assert 0 <= row["kept"] <= row["prompts"]
        assert row["kept"] <= row["mean_leading"] * row["prompts"] / NEW  # a kept prompt matches all NEW
        assert 0 <= row["mean_leading"] <= NEW
        assert row["first_logit_error"] >= 0
    reference = rows["fp32"]  # the float32 run against itself
    assert reference["kept"] == PROMPTS and reference["mean_leading"] == NEW and reference["first_logit_error"] == 0
    assert rows["mxfp4"]["first_logit_error"] > 0 and small_report["reference_margin"] > 0
    kept = {name: f"{row['kept']}/{PROMPTS}" for name, row in rows.items()}
    assert f"greedy kept on {kept['mxfp4']} prompts (FP8: {kept['fp8']})" in small_report["summary"]


def test_simulation_with_model1_entries_is_the_real_fp8_cache(small_report):
    """RoundedV4Cache with MODEL1 entries holds the FP8 cache's values: same logits, same tokens."""
    rows = {r["cache"]: r for r in small_report["rows"]}
    twin, real = rows["fp8-rounded"], rows["fp8"]
    assert (twin["kept"], twin["mean_leading"]) == (real["kept"], real["mean_leading"])
    model = mxfp4.tiny_v4_model(1)
    prompt = mxfp4.random_prompts(1, (18, 18), seed=5)[0]
    tokens, logits = mxfp4.generate(model, prompt, NEW, "fp8")
    twin_tokens, twin_logits = mxfp4.generate(model, prompt, NEW, "fp8-rounded")
    assert torch.equal(twin_tokens, tokens) and torch.equal(twin_logits, logits)


def test_bytes_are_section_1s_accounting(small_report):
    """The FP8 ratios are the memory section's (the same compact V4Cache, the same V3.2
    baseline); MXFP4 entries take V4-Pro from 10.55% to about 7.1% of V3.2's FP8 cache at 1M tokens."""
    ratio = {(r["model"], r["entries"]): r["ratio_vs_v32_at_1m"] for r in small_report["bytes"]}
    context = {(r["model"], r["kv_dtype"]): r["ratio_vs_v32_at_1m"] for r in memory.context_rows()}
    for model in ("DeepSeek-V4-Flash", "DeepSeek-V4-Pro"):
        assert ratio[(model, "fp8")] == pytest.approx(context[(model, "fp8")], rel=1e-12)
        assert ratio[(model, "mxfp4")] < ratio[(model, "fp8")]
    assert round(100 * ratio[("DeepSeek-V4-Pro", "fp8")], 1) == 10.5
    assert round(100 * ratio[("DeepSeek-V4-Pro", "mxfp4")], 1) == 7.1


def test_quick_report_skips_the_section():
    """Section 6 runs only with --full's settings; the quick run notes why it was skipped."""
    cpu = torch.device("cpu")
    assert report.Settings.quick(cpu).mxfp4_prompts == 0 and report.Settings.full(cpu).mxfp4_prompts == 40
    rep = report.run(report.Settings.quick(cpu), cpu, sections=["mxfp4"], log=lambda text: None)
    assert "mxfp4" not in rep and "--full" in rep["notes"]["mxfp4"]


def test_rejects_bad_sizes():
    with pytest.raises(ValueError, match="must be >= 1"):
        mxfp4.mxfp4_report(prompts=0)
    with pytest.raises(ValueError, match="reference 'fp32' must be one of"):
        mxfp4.mxfp4_report(caches=("fp8",))
    with pytest.raises(ValueError, match="cache must be one of"):
        mxfp4.generate(None, torch.zeros(3, dtype=torch.long), 1, "fp4")
