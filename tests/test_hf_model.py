"""MLAForCausalLM.from_hf on mixture-of-experts checkpoints: our attention and dense MLPs,
transformers' own MoE blocks (DeepseekV3MoE / DeepseekV2Moe) for the MoE layers."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

from mla import MLAForCausalLM
from mla.model import MLP

from .utils import assert_close, max_error, randomize_

VOCAB = 97
# As tests/test_model.py: our float32 logits within 3x transformers' own float32 error, both
# against transformers in float64 (two float32 roundings of the same math).
HF_ERROR_FACTOR = 3.0

pytestmark = pytest.mark.usefixtures("one_thread")


def moe_model(version: str) -> torch.nn.Module:
    """Three layers: 0 dense, 1-2 MoE (4 routed experts, top 2, one shared), float32, eager experts."""
    kwargs = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=12, first_k_dense_replace=1, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
        moe_intermediate_size=32, experts_implementation="eager", attn_implementation="eager",
        rope_parameters={"rope_type": "default", "rope_theta": 100.0}, pad_token_id=None, bos_token_id=None,
        eos_token_id=None,
    )  # fmt: skip
    if version == "v3":
        model = DeepseekV3ForCausalLM(DeepseekV3Config(**kwargs, n_group=1, topk_group=1))
    else:
        model = DeepseekV2ForCausalLM(DeepseekV2Config(**kwargs))
    return randomize_(model.eval(), seed=0)


@pytest.mark.parametrize("version", ["v3", "v2"])
def test_from_hf_keeps_transformers_moe_blocks(version):
    """The MoE layers hold a fresh transformers MoE block with copies of the checkpoint's tensors;
    whole-sequence logits and a prefill + token-by-token decode on the paged cache match
    transformers (float64 truth, HF_ERROR_FACTOR x its own float32 error)."""
    hf32 = moe_model(version)
    model = MLAForCausalLM.from_hf(hf32, backend="reference").eval()
    assert type(model.model.layers[0].mlp) is MLP
    for layer in (1, 2):
        ours, theirs = model.model.layers[layer].mlp, hf32.model.layers[layer].mlp
        assert type(ours) is type(theirs) and ours is not theirs
        for (name, p), q in zip(ours.state_dict().items(), theirs.state_dict().values()):
            assert torch.equal(p, q) and p.dtype == q.dtype, name
            assert p.data_ptr() != q.data_ptr(), f"{name} must be a copy, not shared"
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        truth = copy.deepcopy(hf32).double()(tokens).logits
        own_error = max_error(hf32(tokens).logits, truth)
        assert_close("whole sequences", model(tokens), truth, atol=HF_ERROR_FACTOR * own_error)
        cache = model.new_cache(num_pages=8, page_size=4)
        ids = [cache.add_sequence() for _ in range(2)]
        steps = [model.prefill(tokens[:, :8], cache, ids)]
        steps += [model.decode_step(tokens[:, t : t + 1], cache, ids)[:, 0] for t in range(8, 11)]
    assert_close("prefill + decode", torch.stack(steps, dim=1), truth[:, 7:11], atol=HF_ERROR_FACTOR * own_error)
