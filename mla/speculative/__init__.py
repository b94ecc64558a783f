"""Speculative decoding for any causal LM: drafters, one-pass verify, lossless acceptance, per-row rollback.

    from mla.speculative import generate, NgramDrafter
    out = generate(model, input_ids, NgramDrafter(), max_new_tokens=64, num_draft_tokens=4)
    out.sequences, out.stats
"""

from .adapters import CausalLM, HFCausalLM, MLACausalLM, as_causal_lm
from .block import (
    BlockDrafter,
    BlockDrafterConfig,
    BlockDraftModel,
    CostProfile,
    expected_calibration_error,
    measure_cost_profile,
)
from .drafters import Draft, DraftModelDrafter, Drafter, NgramDrafter, Verified
from .loop import SpeculativeOutput, SpeculativeStats, generate
from .mtp import MTPDrafter, MultiTokenPredictor, attach_mtp, load_mtp_state_dict
from .sampling import probabilities, rejection_sample

__all__ = [
    "generate",
    "rejection_sample",
    "probabilities",
    "SpeculativeOutput",
    "SpeculativeStats",
    "Drafter",
    "Draft",
    "Verified",
    "NgramDrafter",
    "DraftModelDrafter",
    "MTPDrafter",
    "BlockDrafter",
    "BlockDraftModel",
    "BlockDrafterConfig",
    "CostProfile",
    "measure_cost_profile",
    "expected_calibration_error",
    "MultiTokenPredictor",
    "attach_mtp",
    "load_mtp_state_dict",
    "CausalLM",
    "MLACausalLM",
    "HFCausalLM",
    "as_causal_lm",
]
