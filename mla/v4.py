"""DeepSeek-V4 hybrid attention: the configuration (the cache is `mla.v4_cache.V4Cache`).

Every V4 layer is shared-KV MQA: one KV head of head_dim 512 that is both K and V, RoPE on its
last rope_dim = 64 channels, attention sinks, and a sliding window over the last
sliding_window = 128 tokens. Layer kinds (`layer_types`, as in transformers' DeepseekV4Config):

    "sliding_attention"             the window only
    "compressed_sparse_attention"   (CSA) also one compressed entry per m = 4 tokens (softmax-
                                    gated pooling over an overlapping window of 2m tokens); a
                                    lightning indexer with its own compressed keys
                                    (index_head_dim each) picks index_topk entries per query
    "heavily_compressed_attention"  (HCA) also one entry per m' = 128 tokens (no overlap), all
                                    attended

Sources (where they disagree, DeepSeek's own config and code win):
  - DeepSeek's config.json of DeepSeek-V4-Flash and DeepSeek-V4-Pro (copies stored in public
    repositories; "compress_ratios" per layer, 0 = sliding, plus one trailing entry for the MTP
    layer): Flash has 43 layers [0, 0, 4, 128, 4, ..., 128, 4] (2 sliding, 21 CSA, 20 HCA),
    64 heads, index_topk 512; Pro has 61 layers [128, 128, 4, 128, 4, ..., 128, 4]
    (31 HCA, 30 CSA), 128 heads, index_topk 1024; both head_dim 512, qk_rope_head_dim 64,
    sliding_window 128, index_n_heads 64, index_head_dim 128.
  - DeepSeek-V4's reference inference/model.py (read in the Nicooo-Wang/DeepSeek-V4-Pro-code
    copy): `Attention` keeps window + max_seq_len // ratio entries per layer, `Compressor`
    overlaps its windows exactly when ratio == 4, the indexer exists exactly in ratio-4 layers,
    FP8 (block 64, UE8M0) on the non-rope channels of window and entries, FP4 (block 32) on
    the indexer's keys.
  - transformers 5.24 models/deepseek_v4/configuration_deepseek_v4.py: the field names
    (`layer_types`, `compress_rates`, `sliding_window`, `index_*`, `qk_rope_head_dim`).
    Its default `layer_types` (the "V4-Pro default") puts the first CSA layer at index 3, i.e.
    32 HCA + 29 CSA; DeepSeek's Pro config has it at index 2 (31 HCA + 30 CSA). We follow
    DeepSeek: `V4Config.deepseek_v4_pro()` carries the explicit schedule.
  - deepseek-ai/FlashMLA tests/quant.py: the FP8 "MODEL1" layout (`mla.formats.Model1Format`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field



SLIDING = "sliding_attention"
CSA = "compressed_sparse_attention"
HCA = "heavily_compressed_attention"
LAYER_TYPES = (SLIDING, CSA, HCA)
"""The layer kinds, with transformers' names."""

COMPRESSED_TYPES = (CSA, HCA)


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


@dataclass(frozen=True)
class V4Config:
    """The DeepSeek-V4 attention dimensions that the cache, compressors and kernels need.

    Args:
        num_hidden_layers: decoder layers (the MTP layer is not counted, as in transformers).
        layer_types: one of LAYER_TYPES per layer.
        compress_rates: tokens per compressed entry for each compressed layer kind, as
            transformers' `compress_rates`: {"compressed_sparse_attention": m,
            "heavily_compressed_attention": m'} (4 and 128), each >= 2.
        head_dim: width of the one shared K = V head (512).
        rope_dim: roped channels at the END of the head (64; transformers' qk_rope_head_dim).
        num_heads: query heads (64 Flash, 128 Pro).
        sliding_window: tokens of the window every layer attends (128).
        index_n_heads, index_head_dim, index_topk: the CSA lightning indexer (64, 128, and
            512 Flash / 1024 Pro). The indexer key is roped on its last rope_dim channels.
        hidden_size: the model width (4096 Flash, 7168 Pro).
        q_lora_rank: the query's low-rank width, q = q_b(norm(q_a(x))) (1024 Flash, 1536 Pro).
        o_groups, o_lora_rank: the grouped output projection: the heads' concatenated output
            splits into o_groups groups, each projected to o_lora_rank (8 / 16 groups, 1024).
        rms_norm_eps: epsilon of every RMS norm of the attention layer (1e-6).
        rope_theta: RoPE base of the sliding layers (10000, no scaling).
        compress_rope_theta: RoPE base of the CSA and HCA layers, their queries, window keys,
            compressed entries and indexer alike (transformers' default 160000).
        rope_scaling: None, or the YaRN extension of the CSA / HCA layers' RoPE (sliding
            layers never scale, in DeepSeek's code and transformers): {"factor",
            "original_max_position_embeddings", "beta_fast" (32), "beta_slow" (1)}, as
            DeepSeek's config.json `rope_scaling` (Pro: factor 16 over 65536). Frequencies
            only: neither DeepSeek nor transformers (attention_factor 1.0) scales cos/sin or
            the softmax by YaRN's mscale.

    Raises ValueError naming the field for anything the cache cannot hold. A frozen value:
    `compress_rates` is copied at construction (and not hashable, so neither is the config).
    """

    num_hidden_layers: int
    layer_types: tuple[str, ...]
    compress_rates: Mapping[str, int] = field(default_factory=lambda: {CSA: 4, HCA: 128})
    head_dim: int = 512
    rope_dim: int = 64
    num_heads: int = 64
    sliding_window: int = 128
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    hidden_size: int = 4096
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_scaling: Mapping[str, float] | None = None

    def __post_init__(self):
        n = _check_int("num_hidden_layers", self.num_hidden_layers, 1)
        if isinstance(self.layer_types, str) or not hasattr(self.layer_types, "__iter__"):
            raise ValueError(f"layer_types must be a sequence of layer type names, got {self.layer_types!r}")
        types = tuple(self.layer_types)
        bad = sorted({t for t in types if t not in LAYER_TYPES}, key=str)
        if bad:
            raise ValueError(f"layer_types has unknown entries {bad}; each must be one of {LAYER_TYPES}")
        if len(types) != n:
            raise ValueError(f"layer_types has {len(types)} entries for num_hidden_layers={n}")
        object.__setattr__(self, "layer_types", types)

        if not isinstance(self.compress_rates, Mapping):
            raise ValueError(f"compress_rates must be a mapping {{layer type: rate}}, got {self.compress_rates!r}")
        rates = dict(self.compress_rates)
        unknown = sorted(set(rates) - set(COMPRESSED_TYPES), key=str)
        if unknown:
            raise ValueError(f"compress_rates has keys {unknown}; only {COMPRESSED_TYPES} are compressed")
        for kind in COMPRESSED_TYPES:
            if kind in types and kind not in rates:
                raise ValueError(f"compress_rates has no rate for {kind!r}, which layer_types uses")
        for kind, rate in rates.items():
            _check_int(f"compress_rates[{kind!r}]", rate, 2)
        object.__setattr__(self, "compress_rates", rates)

        _check_int("head_dim", self.head_dim, 1)
        _check_int("rope_dim", self.rope_dim, 0)
        if self.rope_dim % 2 or self.rope_dim >= self.head_dim:
            raise ValueError(f"rope_dim={self.rope_dim} must be even and below head_dim={self.head_dim}")
        _check_int("num_heads", self.num_heads, 1)
        _check_int("sliding_window", self.sliding_window, 1)
        _check_int("index_n_heads", self.index_n_heads, 1)
        _check_int("index_head_dim", self.index_head_dim, 1)
        _check_int("index_topk", self.index_topk, 1)
        if CSA in types and self.index_head_dim < self.rope_dim:
            raise ValueError(
                f"index_head_dim={self.index_head_dim} must hold the rope_dim={self.rope_dim} roped channels "
                "of the indexer key"
            )
        _check_int("hidden_size", self.hidden_size, 1)
        _check_int("q_lora_rank", self.q_lora_rank, 1)
        _check_int("o_groups", self.o_groups, 1)
        _check_int("o_lora_rank", self.o_lora_rank, 1)
        if (self.num_heads * self.head_dim) % self.o_groups:
            raise ValueError(
                f"o_groups={self.o_groups} must divide num_heads * head_dim = {self.num_heads * self.head_dim}"
            )
        for name in ("rms_norm_eps", "rope_theta", "compress_rope_theta"):
            object.__setattr__(self, name, _check_positive(name, getattr(self, name)))
        object.__setattr__(self, "rope_scaling", _check_rope_scaling(self.rope_scaling))

    def layers_of(self, kind: str) -> tuple[int, ...]:
        """Indices of the layers of one kind (one of LAYER_TYPES)."""
        if kind not in LAYER_TYPES:
            raise ValueError(f"kind must be one of {LAYER_TYPES}, got {kind!r}")
        return tuple(i for i, t in enumerate(self.layer_types) if t == kind)

    def compress_rate(self, layer: int) -> int:
        """Tokens per compressed entry of a layer; 0 for a sliding layer (DeepSeek's
        `compress_ratios` convention)."""
        return self.compress_rates.get(self.layer_types[layer], 0)

    @classmethod
    def from_compress_ratios(cls, compress_ratios, num_hidden_layers: int | None = None, **kwargs) -> V4Config:
        """From DeepSeek's per-layer `compress_ratios`: 0 = sliding, 4 = CSA (DeepSeek's
        reference gives exactly the ratio-4 layers an indexer and overlapping windows), any one
        other rate >= 2 = HCA. Entries past num_hidden_layers (default: all), such as the MTP
        layer's trailing 0, are dropped. Other fields go through `kwargs`."""
        ratios = [_check_int("compress_ratios entry", r, 0) for r in compress_ratios]
        n = len(ratios) if num_hidden_layers is None else num_hidden_layers
        ratios = ratios[:n]
        hca = sorted({r for r in ratios if r not in (0, 4)})
        if len(hca) > 1 or 1 in hca:
            raise ValueError(
                f"compress_ratios must hold 0, 4 and at most one other rate >= 2, got {sorted(set(ratios))}"
            )
        kind = {0: SLIDING, 4: CSA, **{r: HCA for r in hca}}
        rates = {kind[r]: r for r in set(ratios) if r}
        return cls(num_hidden_layers=n, layer_types=tuple(kind[r] for r in ratios), compress_rates=rates, **kwargs)

    @classmethod
    def deepseek_v4_flash(cls) -> V4Config:
        """DeepSeek-V4-Flash (DeepSeek's config.json): 43 layers, 2 sliding then CSA / HCA
        alternating from CSA (21 CSA, 20 HCA), 64 heads, index_topk 512. The projection fields
        are transformers' defaults, which are Flash's (hidden 4096, q_lora_rank 1024, 8 groups
        of 1024); the RoPE fields keep transformers' defaults (load a checkpoint's with
        `from_hf`)."""
        return cls.from_compress_ratios([0, 0] + [4, 128] * 20 + [4], num_heads=64, index_topk=512)

    @classmethod
    def deepseek_v4_pro(cls) -> V4Config:
        """DeepSeek-V4-Pro (DeepSeek's config.json): 61 layers, HCA at 0 and 1 then CSA / HCA
        alternating from CSA at layer 2 (30 CSA, 31 HCA), 128 heads, index_topk 1024, hidden
        7168, q_lora_rank 1536, 16 output groups of 1024, YaRN factor 16 over 65536 positions
        (compress_rope_theta keeps transformers' default)."""
        return cls.from_compress_ratios(
            [128] + [128, 4] * 30, num_heads=128, index_topk=1024, hidden_size=7168, q_lora_rank=1536, o_groups=16,
            rope_scaling={"factor": 16, "original_max_position_embeddings": 65536},
        )  # fmt: skip

    @classmethod
    def from_hf(cls, hf_config) -> V4Config:
        """From a transformers DeepseekV4Config (its `layer_types` and `compress_rates`, which
        it already derived from a checkpoint's legacy `compress_ratios`)."""
        if getattr(hf_config, "model_type", None) != "deepseek_v4":
            model_type = getattr(hf_config, "model_type", None)
            raise ValueError(f"from_hf needs a DeepseekV4Config, got model_type {model_type!r}")
        if getattr(hf_config, "num_key_value_heads", 1) != 1:
            raise ValueError(f"DeepSeek-V4 shares one KV head; num_key_value_heads={hf_config.num_key_value_heads}")
        types = tuple(hf_config.layer_types)
        main, compress = hf_config.rope_parameters["main"], hf_config.rope_parameters["compress"]
        if main.get("rope_type", "default") != "default":
            raise ValueError(f"sliding layers use plain RoPE in DeepSeek-V4, got rope_parameters['main'] {main}")
        rope_type = compress.get("rope_type", "default")
        if rope_type not in ("default", "yarn") or compress.get("attention_factor", 1.0) != 1.0:
            raise ValueError(
                "the compressed layers' RoPE must be plain or YaRN without attention_factor (DeepSeek's), got "
                f"rope_parameters['compress'] {compress}"
            )
        scaling = None
        if rope_type == "yarn":
            scaling = {k: compress[k] for k in ("factor", "original_max_position_embeddings")}
            scaling.update({k: compress.get(k) or default for k, default in (("beta_fast", 32), ("beta_slow", 1))})
        return cls(
            num_hidden_layers=hf_config.num_hidden_layers,
            layer_types=types,
            compress_rates={k: v for k, v in hf_config.compress_rates.items() if k in types},
            head_dim=hf_config.head_dim,
            rope_dim=hf_config.qk_rope_head_dim,
            num_heads=hf_config.num_attention_heads,
            sliding_window=hf_config.sliding_window,
            index_n_heads=hf_config.index_n_heads,
            index_head_dim=hf_config.index_head_dim,
            index_topk=hf_config.index_topk,
            hidden_size=hf_config.hidden_size,
            q_lora_rank=hf_config.q_lora_rank,
            o_groups=hf_config.o_groups,
            o_lora_rank=hf_config.o_lora_rank,
            rms_norm_eps=hf_config.rms_norm_eps,
            rope_theta=main["rope_theta"],
            compress_rope_theta=compress["rope_theta"],
            rope_scaling=scaling,
        )

    def hf_kwargs(self) -> dict:
        """The DeepseekV4Config keyword arguments for these fields (the rest keep their
        transformers defaults)."""
        return dict(
            num_hidden_layers=self.num_hidden_layers,
            layer_types=list(self.layer_types),
            compress_rates=dict(self.compress_rates),
            head_dim=self.head_dim,
            partial_rotary_factor=self.rope_dim / self.head_dim,
            num_attention_heads=self.num_heads,
            num_key_value_heads=1,
            sliding_window=self.sliding_window,
            index_n_heads=self.index_n_heads,
            index_head_dim=self.index_head_dim,
            index_topk=self.index_topk,
            hidden_size=self.hidden_size,
            q_lora_rank=self.q_lora_rank,
            o_groups=self.o_groups,
            o_lora_rank=self.o_lora_rank,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            compress_rope_theta=self.compress_rope_theta,
            rope_parameters=None if self.rope_scaling is None else {"rope_type": "yarn", **self.rope_scaling},
        )


def _check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


ROPE_SCALING_KEYS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow")


def _check_rope_scaling(scaling) -> dict[str, float] | None:
    """A copy of a YaRN `rope_scaling` with beta_fast / beta_slow defaulted (32, 1); DeepSeek's
    `type` / transformers' `rope_type` key, if present, must say "yarn"."""
    if scaling is None:
        return None
    if not isinstance(scaling, Mapping):
        raise ValueError(f"rope_scaling must be None or a mapping of YaRN parameters, got {scaling!r}")
    scaling = dict(scaling)
    kind = scaling.pop("type", scaling.pop("rope_type", "yarn"))
    if kind != "yarn":
        raise ValueError(f"rope_scaling must be YaRN (DeepSeek-V4's only scaling), got type {kind!r}")
    unknown = sorted(set(scaling) - set(ROPE_SCALING_KEYS), key=str)
    if unknown:
        raise ValueError(f"rope_scaling has keys {unknown}; YaRN takes {ROPE_SCALING_KEYS}")
    for key in ROPE_SCALING_KEYS[:2]:
        if key not in scaling:
            raise ValueError(f"rope_scaling needs {key!r}, got {scaling}")
    scaling.setdefault("beta_fast", 32)
    scaling.setdefault("beta_slow", 1)
    out = {k: _check_positive(f"rope_scaling[{k!r}]", scaling[k]) for k in ROPE_SCALING_KEYS}
    out["original_max_position_embeddings"] = _check_int(
        "rope_scaling['original_max_position_embeddings']", scaling["original_max_position_embeddings"], 1
    )
    return out
