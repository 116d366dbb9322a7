"""The CUDA extension megatron_evomoe._C_cuda and the permutation contract it implements.

* CPU: the loader returns None and says why; the PyTorch reference of the contract (kernels/permute.py's
  ``*_reference``, the torch backend of the ops) against dumb loops.
* GPU (``@pytest.mark.gpu``): the extension against the reference, forward and backward, on uneven and
  empty expert groups, dropped slots, odd sizes, misaligned rows, fp32/fp16/bf16.
"""
import pytest
import torch

from megatron_evomoe.kernels import permute as pk
from megatron_evomoe.ops import _ext
from tests.kernels.permute_loops import loop_permute, loop_unpermute, loop_unpermute_bwd


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


# ---------------------------------------------------------------------------------------------
# Loader
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the loader on a machine without CUDA")
def test_load_returns_none_without_cuda_and_says_why():
    _ext.reset()
    assert _ext.load() is None
    text = _ext.describe()
    assert text.startswith("cuda_ext: ")
    if torch.version.cuda is None:
        assert f"not built (torch {torch.__version__} is a CPU build" in text
    else:
        assert "no CUDA device" in text or "not built" in text
    assert "; cpu_ext: " in text


def test_disable_switch(monkeypatch):
    monkeypatch.setenv("EVOMOE_DISABLE_CUDA_EXT", "1")
    _ext.reset()
    try:
        assert _ext.load() is None
        assert _ext.describe().startswith("cuda_ext: disabled (EVOMOE_DISABLE_CUDA_EXT is set)")
    finally:
        monkeypatch.delenv("EVOMOE_DISABLE_CUDA_EXT")
        _ext.reset()


# ---------------------------------------------------------------------------------------------
# The reference of the contract against dumb loops (tests/kernels/permute_loops.py)
# ---------------------------------------------------------------------------------------------
def _routing(T, K, E, *, drop=0.0, skew=False, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    if skew:  # uneven groups, several experts empty
        probs = torch.tensor([0.6, 0.0, 0.3, 0.0] + [0.1 / max(E - 4, 1)] * max(E - 4, 0))[:E]
        idx = torch.multinomial(probs / probs.sum(), T * K, replacement=True, generator=g).view(T, K)
    else:
        idx = torch.randint(0, E, (T, K), generator=g)
    if drop:
        mask = torch.rand(T, K, generator=g) < drop
        idx = torch.where(mask, torch.where(torch.rand(T, K, generator=g) < 0.5, -1, E), idx)
    return idx.to(device)


@pytest.mark.parametrize(
    "T,K,E,C,drop,skew",
    [(0, 2, 4, 8, 0.0, False), (1, 1, 1, 3, 0.0, False), (7, 2, 4, 5, 0.0, True), (13, 3, 5, 4, 0.3, False),
     (9, 4, 6, 2, 0.0, True)],
)
def test_reference_matches_the_loops(T, K, E, C, drop, skew):
    x = torch.randn(T, C, dtype=torch.float64)
    idx = _routing(T, K, E, drop=drop, skew=skew, seed=T)
    x_perm, row_map, counts = pk.permute_reference(x, idx, E)
    want = loop_permute(x, idx, E)
    assert torch.equal(x_perm, want[0]) and torch.equal(row_map, want[1]) and torch.equal(counts, want[2])
    assert torch.equal(pk.expert_histogram_reference(idx, E), want[2])
    gates = torch.rand(T, K, dtype=torch.float64)
    y_perm = torch.randn(T * K, C, dtype=torch.float64)
    torch.testing.assert_close(pk.unpermute_reference(y_perm, row_map, gates), loop_unpermute(y_perm, row_map, gates))
    torch.testing.assert_close(pk.unpermute_reference(y_perm, row_map, None), loop_unpermute(y_perm, row_map, None))


@pytest.mark.parametrize("T,K,E,C", [(11, 2, 4, 6), (0, 2, 3, 4), (5, 1, 1, 3)])
def test_reference_gradients_match_the_contract(T, K, E, C):
    idx = _routing(T, K, E, drop=0.2, seed=3)
    x = torch.randn(T, C, dtype=torch.float64, requires_grad=True)
    x_perm, row_map, _ = pk.permute_reference(x, idx, E)
    grad_x_perm = torch.randn_like(x_perm)
    x_perm.backward(grad_x_perm)
    # permute_backward == unpermute with unit gates.
    torch.testing.assert_close(x.grad, loop_unpermute(grad_x_perm, row_map, None))

    y_perm = torch.randn(T * K, C, dtype=torch.float64, requires_grad=True)
    gates = torch.rand(T, K, dtype=torch.float64, requires_grad=True)
    grad_y = torch.randn(T, C, dtype=torch.float64)
    pk.unpermute_reference(y_perm, row_map, gates).backward(grad_y)
    want_y_perm, want_gates = loop_unpermute_bwd(grad_y, y_perm.detach(), row_map, gates.detach())
    torch.testing.assert_close(y_perm.grad, want_y_perm)
    torch.testing.assert_close(gates.grad, want_gates)


# ---------------------------------------------------------------------------------------------
# The CUDA extension against the reference (GPU only)
# ---------------------------------------------------------------------------------------------
def _ext_or_skip():
    module = _ext.load()
    if module is None:
        pytest.skip(f"the CUDA extension is not loaded: {_ext.describe()}")
    return module


GPU_CASES = [
    # T, K, E, C, drop, skew
    (0, 2, 4, 64, 0.0, False),
    (1, 1, 1, 8, 0.0, False),
    (5, 2, 8, 7, 0.0, False),  # odd C: element-wise path
    (33, 2, 4, 129, 0.2, False),  # dropped slots, odd C
    (257, 1, 16, 256, 0.0, True),  # empty experts, 16-byte packs
    (4099, 2, 64, 320, 0.05, False),  # several 2048-slot chunks
    (3000, 4, 1024, 64, 0.0, False),  # MAX_EXPERTS
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,K,E,C,drop,skew", GPU_CASES)
def test_cuda_permute_matches_reference(T, K, E, C, drop, skew, dtype):
    ext = _ext_or_skip()
    idx = _routing(T, K, E, drop=drop, skew=skew, seed=T + C, device="cuda")
    x = torch.randn(T, C, device="cuda").to(dtype)
    x_perm, row_map, counts = ext.permute(x, idx, E)
    want = pk.permute_reference(x, idx, E)
    assert torch.equal(row_map, want[1])
    assert torch.equal(counts, want[2])
    assert torch.equal(x_perm, want[0])
    assert torch.equal(ext.expert_histogram(idx, E), want[2])
    # int32 routing gives the same answer.
    assert torch.equal(ext.permute(x, idx.int(), E)[1], row_map)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,K,E,C,drop,skew", GPU_CASES)
def test_cuda_unpermute_and_backward_match_reference(T, K, E, C, drop, skew, dtype):
    ext = _ext_or_skip()
    idx = _routing(T, K, E, drop=drop, skew=skew, seed=T + 2 * C, device="cuda")
    _, row_map, _ = pk.permute_reference(torch.zeros(T, 1, device="cuda"), idx, E)
    y_perm = torch.randn(T * K, C, device="cuda").to(dtype)
    gates = torch.rand(T, K, device="cuda")
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}

    torch.testing.assert_close(ext.unpermute(y_perm, row_map, gates), pk.unpermute_reference(y_perm, row_map, gates), **tol)
    torch.testing.assert_close(ext.unpermute(y_perm, row_map), pk.unpermute_reference(y_perm, row_map), **tol)
    grad = torch.randn(T * K, C, device="cuda").to(dtype)
    torch.testing.assert_close(ext.permute_backward(grad, row_map), pk.unpermute_reference(grad, row_map), **tol)

    y_ref = y_perm.detach().clone().requires_grad_(True)
    g_ref = gates.detach().clone().requires_grad_(True)
    grad_y = torch.randn(T, C, device="cuda").to(dtype)
    pk.unpermute_reference(y_ref, row_map, g_ref).backward(grad_y)
    grad_y_perm, grad_gates = ext.unpermute_backward(grad_y, y_perm, row_map, gates)
    assert grad_y_perm.dtype == dtype and grad_gates.dtype == gates.dtype
    torch.testing.assert_close(grad_y_perm, y_ref.grad, **tol)
    torch.testing.assert_close(grad_gates, g_ref.grad, atol=1e-3 * max(C, 1) ** 0.5, rtol=1e-3)


@pytest.mark.gpu
def test_cuda_misaligned_and_strided_inputs():
    ext = _ext_or_skip()
    T, K, E, C = 37, 2, 5, 64
    buf = torch.randn(T * C + 1, device="cuda")
    x = buf[1:].view(T, C)  # 4-byte offset: not 16-byte aligned
    idx = _routing(T, K, E, seed=1, device="cuda")
    want = pk.permute_reference(x, idx, E)
    got = ext.permute(x, idx, E)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    xt = torch.randn(C, T, device="cuda").t()  # non-contiguous
    assert torch.equal(ext.permute(xt, idx, E)[0], pk.permute_reference(xt, idx, E)[0])
    gates = torch.rand(T, K, device="cuda")
    y_perm = torch.randn(T * K * C + 1, device="cuda")[1:].view(T * K, C)
    torch.testing.assert_close(ext.unpermute(y_perm, want[1], gates), pk.unpermute_reference(y_perm, want[1], gates))


@pytest.mark.gpu
def test_cuda_rejects_bad_inputs():
    ext = _ext_or_skip()
    x = torch.randn(4, 8, device="cuda")
    idx = torch.zeros(4, 2, dtype=torch.int64, device="cuda")
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        ext.permute(x.cpu(), idx.cpu(), 4)
    with pytest.raises(RuntimeError, match="num_experts must be in"):
        ext.permute(x, idx, 0)
    with pytest.raises(RuntimeError, match="num_experts must be in"):
        ext.expert_histogram(idx, ext.MAX_EXPERTS + 1)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        ext.permute(x.double(), idx, 4)
    with pytest.raises(RuntimeError, match="topk_idx has 3 tokens"):
        ext.permute(x, idx[:3], 4)
