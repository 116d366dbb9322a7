"""The CPU extension (megatron_evomoe._C_cpu, backend cpu_ext) == the PyTorch backend, on inputs
large enough for its parallel paths (many tokens, many experts, 2-3 threads).

It must be built here (CI runs `pip install --no-build-isolation -e .` first): these tests fail,
not skip, when it is missing."""
import pytest
import torch

from megatron_evomoe.ops import _ext
from megatron_evomoe.ops.grouped_gemm import grouped_mm
from megatron_evomoe.ops.permute import permute, unpermute


@pytest.fixture(autouse=True)
def built():
    if _ext.load_cpu() is None:
        pytest.fail(f"megatron_evomoe._C_cpu is not built or not loadable ({_ext.describe()}); "
                    "build it with `pip install --no-build-isolation -e .`")


@pytest.fixture(params=[2, 3])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def routing(T, K, E, seed, drop=0.0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    idx[torch.rand(T, K, generator=g) < drop] = -1
    return idx


def moe_roundtrip(backend, x, idx, gates, w, E):
    """permute -> grouped_mm -> unpermute, and the gradients of x, gates and w."""
    x_perm, row_map, counts = permute(x, idx, E, backend=backend)
    y = unpermute(grouped_mm(x_perm, w, counts.cumsum(0), backend=backend), row_map, gates, backend=backend)
    grads = torch.autograd.grad(y.square().sum(), (x, gates, w))
    return (y, row_map, counts, *grads)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("E,drop", [(6, 0.1), (48, 0.0)])
def test_moe_roundtrip_matches_torch_backend(threads, dtype, tol, E, drop):
    T, K, C, N = 301, 2, 24, 40
    g = torch.Generator().manual_seed(E)
    x = torch.randn(T, C, generator=g).to(dtype).requires_grad_()
    gates = torch.rand(T, K, generator=g).requires_grad_()
    w = (torch.randn(E, C, N, generator=g) / C ** 0.5).to(dtype).requires_grad_()
    idx = routing(T, K, E, seed=E, drop=drop)
    got = moe_roundtrip("cpu_ext", x, idx, gates, w, E)
    ref = moe_roundtrip("torch", x, idx, gates, w, E)
    assert torch.equal(got[1], ref[1]) and torch.equal(got[2], ref[2])  # row_map, counts: exact
    for name, a, b in zip(("y", "dx", "dgates", "dw"), (got[0], *got[3:]), (ref[0], *ref[3:])):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


def test_results_do_not_depend_on_the_thread_count():
    """Each expert's GEMM runs whole on one thread: 1, 2 and 3 threads give bit-identical results,
    which the bitwise kill-and-resume checks rely on."""
    T, K, C, N, E = 257, 2, 32, 48, 16
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, C, generator=g).requires_grad_()
    gates = torch.rand(T, K, generator=g).requires_grad_()
    w = torch.randn(E, C, N, generator=g).requires_grad_()
    idx = routing(T, K, E, seed=1)
    before = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            runs.append(moe_roundtrip("cpu_ext", x, idx, gates, w, E))
    finally:
        torch.set_num_threads(before)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_bad_offsets_raise():
    x, w = torch.randn(5, 4), torch.randn(2, 4, 3)
    with pytest.raises(RuntimeError, match="non-decreasing"):
        _ext.load_cpu().grouped_mm(x, w, torch.tensor([4, 2]))
    with pytest.raises(RuntimeError, match="<= 5"):
        _ext.load_cpu().grouped_mm(x, w, torch.tensor([2, 9]))
