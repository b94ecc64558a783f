import os

# The Triton interpreter runs the kernels on CPU tensors; it must be on before any
# module with @triton.jit is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def nan_empty(monkeypatch):
    """Make torch.empty / empty_like return NaN-filled floats, so an output element a kernel
    never writes fails the comparison instead of passing by luck."""
    empty, empty_like = torch.empty, torch.empty_like

    def fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(empty_like(*a, **k)))


@pytest.fixture
def one_thread():
    """Tiny models: intra-op threads only add synchronisation, which on a shared 2-core CI box
    costs more than the math."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
