"""Permute / unpermute Triton kernels (forward and backward) against the loop references.

Also checks that the loops agree with the PyTorch reference of kernels/permute.py (the executable
form of the contract in megatron_evomoe/ops/_ext.py, which the CUDA extension implements). On CPU
the kernels run under TRITON_INTERPRET=1; the `gpu` tests run the same checks compiled on CUDA.
"""
import pytest
import torch

from megatron_evomoe.kernels import permute as pk
from tests.kernels.permute_loops import loop_permute, loop_unpermute, loop_unpermute_bwd

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _nan(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def _routing(T, K, E, seed, drop=0.0, empty_expert=None):
    """topk_idx [T, K]: distinct experts per token, some slots dropped (-1 or E), one expert unused."""
    g = torch.Generator().manual_seed(seed)
    choices = [e for e in range(E) if e != empty_expert]
    idx = torch.stack([torch.tensor(choices)[torch.randperm(len(choices), generator=g)[:K]] for _ in range(T)])
    dropped = torch.rand(T, K, generator=g) < drop
    bad = torch.where(torch.rand(T, K, generator=g) < 0.5, -1, E)  # both kinds of out-of-range id
    return torch.where(dropped, bad, idx)


def check_all(T, C, E, K, dtype, device, drop=0.0, extra_rows=0, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    empty = E // 2 if E > K else None  # leave one expert without tokens when there are enough
    idx = _routing(T, K, E, seed, drop=drop, empty_expert=empty).to(device)
    x = torch.randn(T, C, generator=g).to(device=device, dtype=dtype)
    gates = torch.rand(T, K, generator=g).to(device)
    grad_y = torch.randn(T, C, generator=g).to(device=device, dtype=dtype)

    x_perm, row_map, counts = pk.permute_fwd(x, idx, E, out=_nan((T * K, C), dtype, device))
    x_ref, row_ref, counts_ref = loop_permute(x.cpu(), idx.cpu(), E)
    assert not torch.isnan(x_perm).any()
    assert torch.equal(x_perm.cpu(), x_ref)  # a pure copy: exact in every dtype
    assert torch.equal(row_map.cpu(), row_ref) and row_map.dtype == torch.int64
    assert torch.equal(counts.cpu(), counts_ref) and counts.dtype == torch.int64
    assert empty is None or counts[empty] == 0

    # unpermute reads an [N, C] buffer; extra_rows > 0 adds rows that no slot owns.
    y_perm = torch.cat([x_perm * 1.5 - 0.25, torch.randn(extra_rows, C, generator=g).to(device, dtype)])
    y = pk.unpermute_fwd(y_perm, row_map, gates, out=_nan((T, C), dtype, device))
    assert not torch.isnan(y).any()
    torch.testing.assert_close(y.cpu().float(), loop_unpermute(y_perm.cpu(), row_ref, gates.cpu()).float(),
                               **TOL[dtype])

    gyp, gg = pk.unpermute_bwd(grad_y, y_perm, row_map, gates,
                               out=(_nan(tuple(y_perm.shape), dtype, device), _nan((T, K), gates.dtype, device)))
    gyp_ref, gg_ref = loop_unpermute_bwd(grad_y.cpu(), y_perm.cpu(), row_ref, gates.cpu())
    assert not torch.isnan(gyp).any() and not torch.isnan(gg).any()
    torch.testing.assert_close(gyp.cpu().float(), gyp_ref.float(), **TOL[dtype])
    torch.testing.assert_close(gg.cpu(), gg_ref, **TOL[torch.float32 if dtype == torch.float32 else dtype])
    owned = int(counts.sum())
    assert (gyp[owned:] == 0).all(), "rows no slot owns must get a zero gradient"

    gx = pk.permute_bwd(gyp, row_map, out=_nan((T, C), dtype, device))
    assert not torch.isnan(gx).any()
    torch.testing.assert_close(gx.cpu().float(), loop_unpermute(gyp.cpu(), row_ref, None).float(),
                               **TOL[dtype])


@pytest.mark.parametrize("K", [1, 2, 3, 4])
def test_permute_roundtrip_fp32(K):
    # T and C not multiples of the interpreter tiles (8 tokens x 32 channels); drops for K >= 2.
    check_all(T=37, C=70, E=7, K=K, dtype=torch.float32, device="cpu", drop=0.2 if K >= 2 else 0.0,
              extra_rows=3 if K == 3 else 0, seed=K)


@pytest.mark.parametrize("K", [2])
def test_permute_roundtrip_bf16(K):
    check_all(T=29, C=45, E=5, K=K, dtype=torch.bfloat16, device="cpu", drop=0.1, seed=11)


def test_permute_single_expert_and_many_experts():
    check_all(T=13, C=33, E=1, K=1, dtype=torch.float32, device="cpu", drop=0.3, seed=3)
    check_all(T=21, C=17, E=40, K=3, dtype=torch.float32, device="cpu", seed=4)  # E_POW2 = 64 histogram bins


def test_histogram_counts_and_ignores_out_of_range_ids():
    idx = torch.tensor([[0, 3], [3, -1], [5, 3], [2, 7]])
    counts = pk.expert_histogram(idx, 6)
    assert counts.tolist() == [1, 0, 1, 3, 0, 1]


def test_references_follow_the_ext_contract():
    """The loop references and the PyTorch reference of the _ext.py contract (what the CUDA extension
    implements) agree."""
    T, C, E, K = 17, 6, 5, 3
    idx = _routing(T, K, E, seed=5, drop=0.25, empty_expert=1)
    x = torch.randn(T, C)
    gates = torch.rand(T, K)
    x_ref, row_ref, counts_ref = loop_permute(x, idx, E)
    x_ext, row_ext, counts_ext = pk.permute_reference(x, idx, E)
    assert torch.equal(x_ref, x_ext) and torch.equal(row_ref, row_ext) and torch.equal(counts_ref, counts_ext)
    assert torch.equal(counts_ref, pk.expert_histogram_reference(idx, E))
    for g in (gates, None):
        torch.testing.assert_close(loop_unpermute(x_ref, row_ref, g), pk.unpermute_reference(x_ref, row_ref, g))


def test_empty_inputs():
    x = torch.randn(0, 8)
    x_perm, row_map, counts = pk.permute_fwd(x, torch.empty(0, 2, dtype=torch.int64), 4)
    assert x_perm.shape == (0, 8) and row_map.shape == (0, 2) and counts.tolist() == [0, 0, 0, 0]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("K", [1, 2, 4, 8])
def test_permute_roundtrip_cuda(K, dtype):
    check_all(T=301, C=1000, E=16, K=K, dtype=dtype, device="cuda", drop=0.1, extra_rows=5, seed=K)
