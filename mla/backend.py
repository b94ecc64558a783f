"""Which implementation runs: the Triton kernels or their PyTorch references, and absorbed or
decompressed attention. Every caller asks here, so cache writes and attention always agree.

Backend rule: Triton on CUDA tensors or under the Triton interpreter (TRITON_INTERPRET=1,
set before `mla.kernels` is imported), the reference otherwise; a model, module or cache can
override it ("triton" / "reference").

Attention form: `absorbed_is_cheaper` compares multiply-adds per head of the two forms for s
new tokens over a context of L cached tokens (new ones included):

    decompressed = L * r * (nope + v)        every cached latent through kv_b_proj
                 + s * L * (nope + rope + v) scores and output in head space
    absorbed     = s * L * (2 * r + rope)    scores and output in latent space
                 + s * r * (nope + v)        W_UK into each query, W_UV out of each output

For DeepSeek-V3 (r 512, nope = v = 128, rope 64) absorbed wins for any s below about 170 once
L is long, and never for a prefill from an empty cache (s = L): decode and speculative
verification run absorbed, prompts decompressed.
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("triton", "reference")


def interpreting() -> bool:
    """Whether Triton kernels run under the interpreter (on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_backend(backend: str | None) -> str | None:
    """backend as given, after checking it is None or one of BACKENDS."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    return backend


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The backend that runs on `device`: `backend` when given, else the rule above."""
    if check_backend(backend) is not None:
        return backend
    return "triton" if torch.device(device).type == "cuda" or interpreting() else "reference"


def require_triton_device(device: torch.device, alternative: str) -> None:
    """Raise ValueError unless a Triton kernel can run on `device`; `alternative` names the
    reference function to use instead."""
    if torch.device(device).type != "cuda" and not interpreting():
        raise ValueError(
            f"the Triton kernels need CUDA tensors or TRITON_INTERPRET=1 set before mla.kernels is imported; "
            f"got tensors on {device}. On the CPU use {alternative}, which has the same signature"
        )


def absorbed_is_cheaper(config, num_new_tokens: int, context: int) -> bool:
    """Whether s = num_new_tokens queries over `context` cached tokens cost fewer multiply-adds
    in the absorbed form than decompressed (formulas in the module docstring)."""
    r, nope, rope, v = config.kv_lora_rank, config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
    s, length = num_new_tokens, context
    decompressed = length * r * (nope + v) + s * length * (nope + rope + v)
    absorbed = s * length * (2 * r + rope) + s * r * (nope + v)
    return absorbed < decompressed
