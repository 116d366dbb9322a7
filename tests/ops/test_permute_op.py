"""The permute / unpermute ops: every backend vs a plain-torch differentiable reference, custom-op checks."""
import pytest
import torch

from megatron_evomoe.ops import BackendUnavailableError, resolve_backend
from megatron_evomoe.ops import permute as po  # the module (the function is not re-exported)
from megatron_evomoe.ops.permute import permute, unpermute

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def routing(T, K, E, seed, drop=0.0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    return torch.where(torch.rand(T, K, generator=g) < drop, -1, idx)


def expected_order(topk_idx, E):
    """Python: the slots (t, k) in x_perm order, and counts."""
    T, K = topk_idx.shape
    slots = [(t, k) for e in range(E) for t in range(T) for k in range(K) if topk_idx[t, k] == e]
    counts = [sum(1 for t in range(T) for k in range(K) if topk_idx[t, k] == e) for e in range(E)]
    return slots, counts


def check_ops(backend, dtype, device, T, C, E, K, drop, seed=0):
    g = torch.Generator().manual_seed(seed + 100)
    idx = routing(T, K, E, seed, drop).to(device)
    x = torch.randn(T, C, generator=g).to(device, dtype).requires_grad_()
    scale = torch.randn(T * K, 1, generator=g).to(device, dtype)  # a per-row "expert" so rows differ
    gates = torch.rand(T, K, generator=g).to(device).requires_grad_()
    dy = torch.randn(T, C, generator=g).to(device, dtype)

    x_perm, row_map, counts = permute(x, idx, E, backend=backend)
    y = unpermute(x_perm * scale, row_map, gates, backend=backend)
    gx, ggates = torch.autograd.grad(y, (x, gates), dy)

    # Reference: the same math from the slot order, differentiable by plain torch.
    slots, ref_counts = expected_order(idx.cpu(), E)
    assert counts.tolist() == ref_counts and counts.dtype == torch.int64
    rows = torch.full((T, K), -1, dtype=torch.int64)
    for r, (t, k) in enumerate(slots):
        rows[t, k] = r
    assert torch.equal(row_map.cpu(), rows)
    tok = torch.tensor([t for t, _ in slots], dtype=torch.int64, device=device)
    x_perm_ref = torch.zeros(T * K, C, dtype=dtype, device=device)
    x_perm_ref = x_perm_ref.index_put((torch.arange(len(slots), device=device),), x[tok])
    torch.testing.assert_close(x_perm, x_perm_ref, rtol=0, atol=0)
    y_perm_ref = (x_perm_ref * scale).float()
    valid = (rows >= 0).to(device)
    picked = y_perm_ref[rows.clamp(min=0).to(device)] * valid[..., None]
    y_ref = (picked * gates[..., None]).sum(1).to(dtype)
    gx_ref, ggates_ref = torch.autograd.grad(y_ref, (x, gates), dy)
    torch.testing.assert_close(y.float(), y_ref.float(), **TOL[dtype])
    torch.testing.assert_close(gx.float(), gx_ref.float(), **TOL[dtype])
    torch.testing.assert_close(ggates, ggates_ref, **TOL[dtype])


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("K", [1, 2, 4])
def test_permute_unpermute_autograd(backend, K):
    check_ops(backend, torch.float32, "cpu", T=19, C=37, E=6, K=K, drop=0.15, seed=K)


@pytest.mark.parametrize("backend", ["torch", "triton", "cpu_ext"])
def test_permute_unpermute_autograd_bf16(backend):
    check_ops(backend, torch.bfloat16, "cpu", T=15, C=40, E=4, K=2, drop=0.0, seed=9)


def test_backends_agree_exactly():
    idx = routing(23, 3, 5, seed=1, drop=0.2)
    x = torch.randn(23, 17)
    a = permute(x, idx, 5, backend="torch")
    for other in ("triton", "cpu_ext"):
        b = permute(x, idx.int(), 5, backend=other)
        for u, v in zip(a, b):
            assert torch.equal(u, v), other


def test_unpermute_without_gates_and_unowned_rows():
    """gates=None sums the slots; y_perm may have rows no slot owns: their gradient is zero."""
    idx = routing(9, 2, 4, seed=2, drop=0.3)
    x = torch.randn(9, 6)
    for backend in ("torch", "triton", "cpu_ext"):
        x_perm, row_map, counts = permute(x, idx, 4, backend=backend)
        y_perm = torch.cat([x_perm, torch.randn(3, 6)]).requires_grad_()
        y = unpermute(y_perm, row_map, None, backend=backend)
        kept = (idx >= 0).float()
        torch.testing.assert_close(y, x * kept.sum(1, keepdim=True))
        (g,) = torch.autograd.grad(y, y_perm, torch.ones_like(y))
        owned = int(counts.sum())
        assert (g[:owned] == 1).all() and (g[owned:] == 0).all()


def test_backend_resolution_and_errors():
    x, idx = torch.randn(4, 3), torch.zeros(4, 1, dtype=torch.int64)
    assert resolve_backend("auto", "permute", "cpu") == "cpu_ext"  # built by the install CI runs
    with pytest.raises(BackendUnavailableError, match="'cuda_ext' was requested for permute"):
        permute(x, idx, 2, backend="cuda_ext")
    with pytest.raises(BackendUnavailableError, match="unpermute"):
        unpermute(x, idx, None, backend="cuda_ext")
    with pytest.raises(ValueError, match="topk_idx"):
        permute(x, idx.float(), 2)
    with pytest.raises(ValueError, match="num_experts"):
        permute(x, idx, 0)


@pytest.mark.parametrize("backend", ["torch", "triton", "cpu_ext"])
def test_opcheck(backend):
    x = torch.randn(10, 8, requires_grad=True)
    idx = routing(10, 2, 3, seed=3, drop=0.2)
    gates = torch.rand(10, 2, requires_grad=True)
    x_perm, row_map, _ = po.permute_op(x.detach(), idx, 3, backend)
    y_perm = x_perm.clone().requires_grad_()
    torch.library.opcheck(po.permute_op, (x, idx, 3, backend))
    torch.library.opcheck(po.unpermute_op, (y_perm, row_map, gates, backend))
    torch.library.opcheck(po.unpermute_op, (y_perm, row_map, None, backend))
    torch.library.opcheck(po.permute_backward_op, (torch.randn(20, 8), row_map, backend))
    torch.library.opcheck(po.unpermute_backward_op, (torch.randn(10, 8), x_perm, row_map, gates.detach(), backend))


def test_torch_compile_traces_permute_unpermute():
    idx = routing(10, 2, 3, seed=4)
    x = torch.randn(10, 8, requires_grad=True)
    gates = torch.rand(10, 2, requires_grad=True)

    def f(x, gates):
        x_perm, row_map, counts = permute(x, idx, 3)
        return unpermute(x_perm.sin(), row_map, gates).sum()

    got = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(x, gates), (x, gates))
    ref = torch.autograd.grad(f(x, gates), (x, gates))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "torch", "triton", "cuda_ext"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_permute_unpermute_autograd_cuda(backend, dtype):
    if backend == "cuda_ext":
        from megatron_evomoe.ops import _ext
        if _ext.load() is None:
            pytest.skip(f"CUDA extension not built: {_ext.describe()}")
    check_ops(backend, dtype, "cuda", T=133, C=300, E=8, K=2, drop=0.1)
