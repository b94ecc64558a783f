"""Configuration of an MLA attention layer and of the small dense MLA language model.

`MLAConfig` holds the attention dimensions of DeepSeek-V2/V3 style multi-head latent
attention plus the few fields `mla.MLAForCausalLM` needs. It is validated at construction
(frozen: derive variants with `dataclasses.replace`, which validates again).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mla.formats import cache_format, index_key_format, is_fp8_dtype

# YaRN keys with their defaults when absent (beta_fast/beta_slow as in the YaRN paper,
# mscale/mscale_all_dim as in DeepSeek's reference code).
_YARN_DEFAULTS = {"beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.0}
_YARN_REQUIRED = ("factor", "original_max_position_embeddings")
_ROPE_SCALING_TYPES = ("yarn",)


def _check_yarn(rope_scaling: dict) -> dict[str, Any]:
    """Validate a YaRN dict and return it normalized: {"type": "yarn", all six keys}."""
    scaling = dict(rope_scaling)
    # DeepSeek's config.json says "type", transformers says "rope_type"; accept either.
    kinds = {scaling.pop(key) for key in ("type", "rope_type") if key in scaling}
    kind = kinds.pop() if len(kinds) == 1 else (sorted(map(str, kinds)) or None)
    if kind not in _ROPE_SCALING_TYPES:
        raise ValueError(f"rope_scaling type must be one of {_ROPE_SCALING_TYPES}, got {kind!r}")
    unknown = set(scaling) - set(_YARN_REQUIRED) - set(_YARN_DEFAULTS)
    if unknown:
        raise ValueError(f"rope_scaling has unsupported keys {sorted(unknown)} for type {kind!r}")
    for key in _YARN_REQUIRED:
        if scaling.get(key) is None:
            raise ValueError(f"rope_scaling of type 'yarn' needs {key!r}")
    out = {"type": kind, **_YARN_DEFAULTS, **scaling}
    if not out["factor"] >= 1:
        raise ValueError(f"rope_scaling factor must be >= 1, got {out['factor']}")
    if not out["original_max_position_embeddings"] > 0:
        original = out["original_max_position_embeddings"]
        raise ValueError(f"rope_scaling original_max_position_embeddings must be positive, got {original}")
    if not out["beta_fast"] > out["beta_slow"] > 0:
        raise ValueError(f"rope_scaling needs beta_fast > beta_slow > 0, got {out['beta_fast']}, {out['beta_slow']}")
    return out


@dataclass(frozen=True)
class MLAConfig:
    """Dimensions of multi-head latent attention (and of the small dense LM built on it).

    Attention:
        hidden_size: model width.
        num_heads: query heads h.
        q_lora_rank: rank of the query compression (q_a_proj -> q_a_layernorm -> q_b_proj);
            None for a plain q_proj (DeepSeek-V2-Lite).
        kv_lora_rank: latent width r; the cache holds r + qk_rope_head_dim values per token.
        qk_nope_head_dim, qk_rope_head_dim, v_head_dim: per-head dims of the unroped query/key
            part, the roped part (shared by all heads on the key side) and the values.
        rope_theta: RoPE base.
        rope_scaling: None, or YaRN {"type": "yarn", factor, original_max_position_embeddings,
            beta_fast=32, beta_slow=1, mscale=1, mscale_all_dim=0} ("rope_type" is accepted for "type").
        rope_interleave: the roped channels come in interleaved pairs (x0, x1), (x2, x3), ...
            as in DeepSeek's checkpoints; False for the half-split layout.
        rms_norm_eps: epsilon of the decoder RMSNorms. (The latent norms q_a_layernorm and
            kv_a_layernorm use 1e-6 regardless, as DeepSeek's and transformers' code do.)
        attention_bias: bias on q_a_proj, kv_a_proj_with_mqa and o_proj (as transformers).

    DeepSeek-V3.2 sparse attention (all three set, or all None for V2/V3; `mla.attention.Indexer`):
        index_n_heads: heads of the lightning indexer (64 in V3.2).
        index_head_dim: width of its query heads and of its one cached key per token (128); the
            first qk_rope_head_dim channels are roped.
        index_topk: cached tokens each query attends, chosen by the indexer (2048).

    Language model (`mla.MLAForCausalLM`, every layer a dense SwiGLU MLP):
        vocab_size, num_hidden_layers, intermediate_size, max_position_embeddings,
        tie_word_embeddings.
    """

    hidden_size: int = 7168
    num_heads: int = 128
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rope_interleave: bool = True
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    index_n_heads: int | None = None
    index_head_dim: int | None = None
    index_topk: int | None = None
    vocab_size: int = 129280
    num_hidden_layers: int = 61
    intermediate_size: int = 18432
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False

    def __post_init__(self):
        dims = (
            "hidden_size", "num_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
            "vocab_size", "num_hidden_layers", "intermediate_size", "max_position_embeddings",
        )  # fmt: skip
        for name in dims:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.q_lora_rank is not None and (
            isinstance(self.q_lora_rank, bool) or not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0
        ):
            raise ValueError(f"q_lora_rank must be a positive int or None, got {self.q_lora_rank!r}")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be positive, got {self.rope_theta}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps must be positive, got {self.rms_norm_eps}")
        self._check_indexer()
        if self.rope_scaling is not None:
            if not isinstance(self.rope_scaling, dict):
                raise ValueError(f"rope_scaling must be a dict or None, got {self.rope_scaling!r}")
            object.__setattr__(self, "rope_scaling", _check_yarn(self.rope_scaling))

    def _check_indexer(self) -> None:
        fields = {name: getattr(self, name) for name in ("index_n_heads", "index_head_dim", "index_topk")}
        given = [name for name, value in fields.items() if value is not None]
        if not given:
            return
        if len(given) < 3:
            missing = sorted(set(fields) - set(given))
            raise ValueError(f"the indexer needs index_n_heads, index_head_dim and index_topk; {missing} are None")
        for name, value in fields.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.index_head_dim < self.qk_rope_head_dim:
            raise ValueError(
                f"index_head_dim={self.index_head_dim} must hold the qk_rope_head_dim={self.qk_rope_head_dim} "
                "roped channels of the indexer's queries and keys"
            )
        if self.q_lora_rank is None:
            raise ValueError("the indexer reads the compressed query, so index_* fields need a q_lora_rank")

    @property
    def has_indexer(self) -> bool:
        """Whether the layers are DeepSeek-V3.2 sparse attention (a lightning indexer picks index_topk tokens)."""
        return self.index_topk is not None

    @property
    def qk_head_dim(self) -> int:
        """Per-head query/key width: qk_nope_head_dim + qk_rope_head_dim."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def cache_dim(self) -> int:
        """Values cached per token per layer: kv_lora_rank + qk_rope_head_dim (576 for DeepSeek-V3)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def kv_bytes_per_token(self, dtype: torch.dtype | str = torch.bfloat16) -> int:
        """Bytes of cache per token per layer, as `mla.LatentCache(..., dtype).bytes_per_token`:
        the latent row plus, with an indexer, the indexer key (`index_bytes_per_token`).

        Latent row, bfloat16 / float16 / float32: (kv_lora_rank + qk_rope_head_dim) * itemsize
        (1152 for DeepSeek-V3 in bf16). "fp8" or torch.float8_e4m3fn, the FP8 cache: kv_lora_rank
        bytes of codes + 4 per float32 scale (one per min(128, kv_lora_rank) latent values) + 2 *
        qk_rope_head_dim bytes of bfloat16 k_pe (656 for DeepSeek-V3). DeepSeek-V3.2 adds 256
        (bf16) or 132 (FP8) bytes of indexer key: 1408 and 788. ValueError for a dtype or
        dimensions the format cannot hold (`mla.formats`).
        """
        latent = cache_format(dtype, self.kv_lora_rank, self.qk_rope_head_dim).bytes_per_token
        return latent + self.index_bytes_per_token(dtype)

    def index_bytes_per_token(self, dtype: torch.dtype | str = torch.bfloat16) -> int:
        """Bytes of the indexer key per token per layer in a cache of `dtype` (the keys follow
        the latents: FP8 with FP8, else the same dtype): index_head_dim * itemsize, or in FP8
        index_head_dim + 4 per 128 channels (132 for V3.2); 0 without an indexer."""
        if not self.has_indexer:
            return 0
        return index_key_format(dtype, self.index_head_dim).bytes_per_token

    def mha_bytes_per_token(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes per token per layer of a standard cache of decompressed per-head K and V:
        num_heads * (qk_nope_head_dim + qk_rope_head_dim + v_head_dim) * itemsize."""
        return self.num_heads * (self.qk_head_dim + self.v_head_dim) * _itemsize(dtype)

    @classmethod
    def deepseek_v3(cls, **overrides) -> MLAConfig:
        """DeepSeek-V3 (and R1): 61 layers, 128 heads, q_lora 1536, kv_lora 512, YaRN x40."""
        return cls(**{**_DEEPSEEK_V3, **overrides})

    @classmethod
    def deepseek_v2(cls, **overrides) -> MLAConfig:
        """DeepSeek-V2: 60 layers, hidden 5120, 128 heads, q_lora 1536, kv_lora 512, YaRN x40."""
        return cls(**{**_DEEPSEEK_V2, **overrides})

    @classmethod
    def deepseek_v2_lite(cls, **overrides) -> MLAConfig:
        """DeepSeek-V2-Lite: 27 layers, hidden 2048, 16 heads, no query compression, kv_lora 512."""
        return cls(**{**_DEEPSEEK_V2_LITE, **overrides})

    @classmethod
    def deepseek_v32(cls, **overrides) -> MLAConfig:
        """DeepSeek-V3.2: DeepSeek-V3's dimensions plus the lightning indexer (64 heads of 128,
        top-2048)."""
        return cls(**{**_DEEPSEEK_V3, **_V32_INDEXER, **overrides})

    @classmethod
    def from_hf(cls, hf_config) -> MLAConfig:
        """From a transformers DeepseekV2Config, DeepseekV3Config or DeepseekV32Config.

        transformers 5 keeps RoPE settings in `rope_parameters` ({"rope_type", "rope_theta",
        and the YaRN keys}). DeepSeek-V2 has no `rope_interleave` field: its rotary embedding
        multiplies interleaved pairs as complex numbers, which is rope_interleave=True.
        """
        model_type = getattr(hf_config, "model_type", None)
        if model_type not in ("deepseek_v2", "deepseek_v3", "deepseek_v32"):
            raise ValueError(
                f"expected a DeepseekV2Config, DeepseekV3Config or DeepseekV32Config, got model_type {model_type!r}"
            )
        rope = dict(hf_config.rope_parameters or {})
        rope_theta = rope.pop("rope_theta", 10000.0)
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        rope.pop("type", None)
        if rope_type == "default":
            rope_scaling = None
        elif rope_type == "yarn":
            if rope.get("factor") is None:
                # transformers' rule: without a factor, YaRN stretches to max_position_embeddings
                rope["factor"] = hf_config.max_position_embeddings / rope["original_max_position_embeddings"]
            rope_scaling = {"type": "yarn", **{k: v for k, v in rope.items() if v is not None}}
        else:
            raise ValueError(f"rope type {rope_type!r} is not supported (only default RoPE and YaRN)")
        return cls(
            hidden_size=hf_config.hidden_size,
            num_heads=hf_config.num_attention_heads,
            q_lora_rank=hf_config.q_lora_rank,
            kv_lora_rank=hf_config.kv_lora_rank,
            qk_nope_head_dim=hf_config.qk_nope_head_dim,
            qk_rope_head_dim=hf_config.qk_rope_head_dim,
            v_head_dim=hf_config.v_head_dim,
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            rope_interleave=bool(getattr(hf_config, "rope_interleave", True)),
            rms_norm_eps=hf_config.rms_norm_eps,
            attention_bias=hf_config.attention_bias,
            **{name: getattr(hf_config, name) for name in _V32_INDEXER if model_type == "deepseek_v32"},
            vocab_size=hf_config.vocab_size,
            num_hidden_layers=hf_config.num_hidden_layers,
            intermediate_size=hf_config.intermediate_size,
            max_position_embeddings=hf_config.max_position_embeddings,
            tie_word_embeddings=bool(hf_config.tie_word_embeddings),
        )


def _itemsize(dtype) -> int:
    if isinstance(dtype, str) and is_fp8_dtype(dtype):
        dtype = torch.float8_e4m3fn
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    if dtype.itemsize == 1:
        raise ValueError(
            f"{dtype} is not priced: only the latent cache has an 8-bit format, float8_e4m3fn with "
            "per-tile scales (kv_bytes_per_token('fp8'))"
        )
    return dtype.itemsize


_YARN_X40 = {
    "type": "yarn",
    "factor": 40.0,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
}
# Published configs (config.json of deepseek-ai/DeepSeek-V3, DeepSeek-V2, DeepSeek-V2-Lite).
_DEEPSEEK_V3 = dict(
    hidden_size=7168, num_heads=128, q_lora_rank=1536, kv_lora_rank=512,
    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, rope_theta=10000.0,
    rope_scaling={**_YARN_X40, "mscale": 1.0, "mscale_all_dim": 1.0}, rope_interleave=True,
    rms_norm_eps=1e-6, vocab_size=129280, num_hidden_layers=61, intermediate_size=18432,
    max_position_embeddings=163840,
)  # fmt: skip
_DEEPSEEK_V2 = dict(
    hidden_size=5120, num_heads=128, q_lora_rank=1536, kv_lora_rank=512,
    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, rope_theta=10000.0,
    rope_scaling={**_YARN_X40, "mscale": 0.707, "mscale_all_dim": 0.707}, rope_interleave=True,
    rms_norm_eps=1e-6, vocab_size=102400, num_hidden_layers=60, intermediate_size=12288,
    max_position_embeddings=163840,
)  # fmt: skip
_V32_INDEXER = dict(index_n_heads=64, index_head_dim=128, index_topk=2048)
_DEEPSEEK_V2_LITE = {
    **_DEEPSEEK_V2,
    **dict(hidden_size=2048, num_heads=16, q_lora_rank=None, num_hidden_layers=27, intermediate_size=10944),
}
