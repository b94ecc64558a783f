"""MLAConfig: presets, cache sizes, validation, conversion from transformers configs."""

import dataclasses
import math

import pytest
import torch
from transformers import DeepseekV2Config, DeepseekV3Config

from mla import MLAConfig
from mla.rope import softmax_scale

TINY = dict(
    hidden_size=64, num_heads=4, q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16,
    v_head_dim=16, vocab_size=101, num_hidden_layers=2, intermediate_size=96, max_position_embeddings=256,
)  # fmt: skip


@pytest.mark.parametrize(
    "preset, dims, kv_bf16, mha_bf16",
    [
        # (layers, hidden, heads, q_lora, kv_lora, nope, rope, v); bytes per token per layer
        pytest.param(MLAConfig.deepseek_v3, (61, 7168, 128, 1536, 512, 128, 64, 128), 1152, 81920, id="v3"),
        pytest.param(MLAConfig.deepseek_v2, (60, 5120, 128, 1536, 512, 128, 64, 128), 1152, 81920, id="v2"),
        pytest.param(MLAConfig.deepseek_v2_lite, (27, 2048, 16, None, 512, 128, 64, 128), 1152, 10240, id="v2-lite"),
    ],
)
def test_presets(preset, dims, kv_bf16, mha_bf16):
    c = preset()
    got = (c.num_hidden_layers, c.hidden_size, c.num_heads, c.q_lora_rank, c.kv_lora_rank)
    assert got + (c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim) == dims
    assert c.cache_dim == 576
    assert c.kv_bytes_per_token(torch.bfloat16) == kv_bf16 == 576 * 2
    assert c.kv_bytes_per_token(torch.float32) == 576 * 4
    # FP8: 512 e4m3 codes + 4 float32 scales (one per 128) + 64 bf16 k_pe
    assert c.kv_bytes_per_token("fp8") == c.kv_bytes_per_token(torch.float8_e4m3fn) == 512 + 4 * 4 + 64 * 2 == 656
    assert c.mha_bytes_per_token(torch.bfloat16) == mha_bf16 == c.num_heads * (192 + 128) * 2
    assert c.rope_scaling["type"] == "yarn" and c.rope_scaling["factor"] == 40
    assert c.rope_interleave


def test_preset_overrides_and_v3_matches_transformers_defaults():
    small = MLAConfig.deepseek_v3(num_hidden_layers=2)
    assert small.num_hidden_layers == 2 and small.kv_lora_rank == 512
    # transformers' DeepseekV3Config defaults are V3's architecture (without its YaRN settings)
    hf = MLAConfig.from_hf(DeepseekV3Config())
    fields = ("hidden_size", "num_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
              "v_head_dim", "vocab_size", "num_hidden_layers", "intermediate_size", "rms_norm_eps")  # fmt: skip
    assert {f: getattr(hf, f) for f in fields} == {f: getattr(MLAConfig.deepseek_v3(), f) for f in fields}


def test_v3_softmax_scale_has_yarn_mscale():
    # DeepSeek-V3: 192 ** -0.5 * (0.1 * mscale_all_dim * ln 40 + 1) ** 2
    expected = 192**-0.5 * (0.1 * 1.0 * math.log(40) + 1) ** 2
    assert softmax_scale(MLAConfig.deepseek_v3()) == pytest.approx(expected, rel=1e-15)
    assert softmax_scale(MLAConfig(**TINY)) == pytest.approx(32**-0.5, rel=1e-15)


@pytest.mark.parametrize(
    "field, value",
    [
        pytest.param("hidden_size", 0, id="hidden-zero"),
        pytest.param("num_heads", -4, id="heads-negative"),
        pytest.param("kv_lora_rank", 0, id="kv-lora-zero"),
        pytest.param("qk_nope_head_dim", 0, id="nope-zero"),
        pytest.param("v_head_dim", -1, id="v-negative"),
        pytest.param("qk_rope_head_dim", 15, id="rope-odd"),
        pytest.param("qk_rope_head_dim", 0, id="rope-zero"),
        pytest.param("q_lora_rank", 0, id="q-lora-zero"),
        pytest.param("hidden_size", 64.0, id="hidden-float"),
        pytest.param("num_heads", True, id="heads-bool"),
        pytest.param("vocab_size", 0, id="vocab-zero"),
        pytest.param("num_hidden_layers", 0, id="layers-zero"),
        pytest.param("rope_theta", 0.0, id="theta-zero"),
        pytest.param("rms_norm_eps", -1e-6, id="eps-negative"),
        pytest.param("rope_scaling", {"type": "linear", "factor": 2.0}, id="scaling-unknown-type"),
        pytest.param("rope_scaling", {"factor": 2.0, "original_max_position_embeddings": 64}, id="scaling-no-type"),
        pytest.param("rope_scaling", {"type": "yarn", "original_max_position_embeddings": 64}, id="yarn-no-factor"),
        pytest.param("rope_scaling", {"type": "yarn", "factor": 4.0}, id="yarn-no-original-len"),
        pytest.param(
            "rope_scaling", {"type": "yarn", "factor": 0.5, "original_max_position_embeddings": 64}, id="yarn-factor<1"
        ),
        pytest.param(
            "rope_scaling",
            {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "truncate": False},
            id="yarn-unknown-key",
        ),
        pytest.param(
            "rope_scaling",
            {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 1, "beta_slow": 32},
            id="yarn-betas-swapped",
        ),
        pytest.param("rope_scaling", "yarn", id="scaling-not-dict"),
    ],
)
def test_invalid_config_raises(field, value):
    with pytest.raises(ValueError, match=field):
        MLAConfig(**{**TINY, field: value})


def test_replace_revalidates_and_config_is_frozen():
    c = MLAConfig(**TINY)
    with pytest.raises(ValueError, match="even"):
        dataclasses.replace(c, qk_rope_head_dim=9)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.hidden_size = 128


def test_yarn_dict_normalized():
    c = MLAConfig(**TINY, rope_scaling={"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 64})
    assert c.rope_scaling == {
        "type": "yarn", "factor": 4, "original_max_position_embeddings": 64,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.0,
    }  # fmt: skip


@pytest.mark.parametrize(
    "dtype, error",
    [
        pytest.param(torch.float8_e5m2, ValueError, id="float8-e5m2"),
        pytest.param("fp4", ValueError, id="fp4-string"),
        pytest.param(torch.int8, ValueError, id="int8"),
        pytest.param("bf16", ValueError, id="string"),
    ],
)
def test_bytes_per_token_rejects(dtype, error):
    with pytest.raises(error, match="dtype|FP8|float8"):
        MLAConfig.deepseek_v3().kv_bytes_per_token(dtype)


@pytest.mark.parametrize(
    "kv_lora_rank, rope, expected",
    [
        pytest.param(32, 16, 32 + 4 + 32, id="r32-one-tile"),
        pytest.param(384, 64, 384 + 3 * 4 + 128, id="r384-three-tiles"),
        pytest.param(200, 64, None, id="r200-not-tiled"),
    ],
)
def test_fp8_bytes_per_token_general_shapes(kv_lora_rank, rope, expected):
    c = MLAConfig(**{**TINY, "kv_lora_rank": kv_lora_rank, "qk_rope_head_dim": rope})
    if expected is None:
        with pytest.raises(ValueError, match="not a multiple of the FP8 scale tile 128"):
            c.kv_bytes_per_token("fp8")
    else:
        assert c.kv_bytes_per_token("fp8") == expected
    with pytest.raises(ValueError, match="float8_e4m3fn is not priced"):
        c.mha_bytes_per_token("fp8")  # only the latent cache has an FP8 format


def test_from_hf_v3_yarn_and_layout():
    rope = {"rope_type": "yarn", "rope_theta": 5000.0, "factor": 8.0, "original_max_position_embeddings": 32,
            "beta_fast": 16, "beta_slow": 2, "mscale": 0.9, "mscale_all_dim": 1.1}  # fmt: skip
    hf = DeepseekV3Config(
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=8, qk_rope_head_dim=12, v_head_dim=24,
        rope_parameters=rope, rope_interleave=False, max_position_embeddings=256, rms_norm_eps=1e-5,
        attention_bias=True, tie_word_embeddings=True,
    )  # fmt: skip
    c = MLAConfig.from_hf(hf)
    assert (c.hidden_size, c.num_heads, c.q_lora_rank, c.kv_lora_rank) == (64, 4, None, 32)
    assert (c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim) == (8, 12, 24)
    assert (c.vocab_size, c.num_hidden_layers, c.intermediate_size, c.max_position_embeddings) == (101, 3, 96, 256)
    assert c.rope_theta == 5000.0 and c.rms_norm_eps == 1e-5 and c.attention_bias and c.tie_word_embeddings
    assert c.rope_interleave is False
    assert c.rope_scaling == {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32,
                              "beta_fast": 16, "beta_slow": 2, "mscale": 0.9, "mscale_all_dim": 1.1}  # fmt: skip


def test_from_hf_v2_is_interleaved_without_scaling():
    hf = DeepseekV2Config(hidden_size=64, num_attention_heads=4, kv_lora_rank=32, q_lora_rank=24,
                          qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16)  # fmt: skip
    c = MLAConfig.from_hf(hf)
    assert c.rope_interleave is True and c.rope_scaling is None and c.rope_theta == 10000.0


@pytest.mark.parametrize(
    "hf_config, match",
    [
        pytest.param(lambda: DeepseekV3Config(rope_parameters={"rope_type": "linear", "factor": 2.0}), "rope type",
                     id="linear-rope"),
        pytest.param(lambda: type("LlamaLike", (), {"model_type": "llama"})(), "model_type", id="not-deepseek"),
    ],
)  # fmt: skip
def test_from_hf_rejects(hf_config, match):
    with pytest.raises(ValueError, match=match):
        MLAConfig.from_hf(hf_config())
