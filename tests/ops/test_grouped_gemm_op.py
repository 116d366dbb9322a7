"""The grouped_mm op: backend resolution, autograd vs a plain-torch reference, custom-op checks."""
import logging
import types

import pytest
import torch

import megatron_evomoe.ops.backend as backend_mod
from megatron_evomoe.ops import BackendUnavailableError, resolve_backend
from megatron_evomoe.ops import grouped_gemm as ggo
from megatron_evomoe.ops.grouped_gemm import grouped_mm

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=2e-2, atol=3e-2)}


def reference(x, w, counts, tail):
    """Differentiable loop over experts; rows past the last expert give zeros."""
    outs, lo = [], 0
    for e, c in enumerate(counts):
        outs.append(x[lo:lo + c].float() @ w[e].float())
        lo += c
    outs.append(x[lo:lo + tail].float() @ torch.zeros_like(w[0]).float())
    return torch.cat(outs).to(x.dtype)


def check_autograd(backend, dtype, device, counts, tail, K=24, N=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = sum(counts) + tail
    offsets = torch.tensor(counts, device=device).cumsum(0).to(torch.int32)
    x = torch.randn(T, K, generator=g).to(device, dtype).requires_grad_()
    w = torch.randn(len(counts), K, N, generator=g).to(device, dtype).requires_grad_()
    dy = torch.randn(T, N, generator=g).to(device, dtype)
    y = grouped_mm(x, w, offsets, backend=backend)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    y_ref = reference(x, w, counts, tail)
    dx_ref, dw_ref = torch.autograd.grad(y_ref, (x, w), dy)
    for name, got, ref in (("y", y, y_ref), ("dx", dx, dx_ref), ("dw", dw, dw_ref)):
        assert got.dtype == dtype and got.shape == ref.shape
        torch.testing.assert_close(got.float(), ref.float(), **TOL[dtype], msg=lambda m: f"{backend} {name}: {m}")


@pytest.mark.parametrize("backend", ["torch", "triton", "cpu_ext"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_grouped_mm_autograd(backend, dtype):
    check_autograd(backend, dtype, "cpu", counts=[9, 0, 14, 1, 0], tail=3)


@pytest.mark.parametrize("num_threads", [1, 2, 3])
def test_cpu_ext_expert_parallel_path(num_threads):
    """Enough experts for the CPU extension to spread them over threads (>= 2 per thread),
    unbalanced, with empty experts and a tail of unrouted rows: same results as the loop."""
    before = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        counts = [17, 0, 3, 40, 1, 0, 9, 9, 25, 2, 0, 6]
        check_autograd("cpu_ext", torch.float32, "cpu", counts=counts, tail=5, K=33, N=18, seed=num_threads)
        check_autograd("cpu_ext", torch.bfloat16, "cpu", counts=counts, tail=0, K=16, N=24, seed=7)
    finally:
        torch.set_num_threads(before)


def test_grouped_mm_torch_backend_single_expert_and_sum_backward():
    # .sum() hands backward an expanded (stride 0) gradient, which torch._grouped_mm itself rejects.
    x = torch.randn(7, 5, requires_grad=True)
    w = torch.randn(1, 5, 3, requires_grad=True)
    grouped_mm(x, w, torch.tensor([7]), backend="torch").sum().backward()
    torch.testing.assert_close(x.grad, w.detach()[0].sum(1).expand(7, 5))
    torch.testing.assert_close(w.grad[0], x.detach().sum(0)[:, None].expand(5, 3))


def test_grouped_mm_under_autocast_casts_like_matmul():
    x = torch.randn(6, 8, requires_grad=True)
    w = torch.randn(2, 8, 4, requires_grad=True)  # fp32 parameters, bf16 compute
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = grouped_mm(x, w, torch.tensor([2, 6]))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    torch.testing.assert_close(y.float(), reference(x, w, [2, 4], 0).float(), rtol=2e-2, atol=5e-2)


def test_grouped_mm_loop_fallback_matches(monkeypatch):
    # Force the per-expert loop (what runs where torch._grouped_mm refuses the inputs).
    monkeypatch.setattr(ggo, "_try_torch_grouped_mm", lambda *a: None)
    check_autograd("torch", torch.float32, "cpu", counts=[4, 0, 6], tail=2)


def test_resolve_backend_choices(monkeypatch):
    # The CPU extension is built by the install CI runs: auto must find it.
    assert resolve_backend("auto", "grouped_mm", torch.device("cpu")) == "cpu_ext"
    assert resolve_backend("cpu_ext", "grouped_mm", "cpu") == "cpu_ext"
    with pytest.raises(BackendUnavailableError, match="runs on cpu tensors, the inputs are on cuda"):
        resolve_backend("cpu_ext", "grouped_mm", "cuda")
    assert resolve_backend("torch", "grouped_mm", "cpu") == "torch"
    assert resolve_backend("triton", "grouped_mm", "cpu") == "triton"  # TRITON_INTERPRET=1 here
    with pytest.raises(ValueError, match="must be one of"):
        resolve_backend("cublas", "grouped_mm", "cpu")
    with pytest.raises(BackendUnavailableError, match="'cuda_ext' was requested for grouped_mm"):
        resolve_backend("cuda_ext", "grouped_mm", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", "grouped_mm", "cpu")
    from megatron_evomoe.ops import _ext
    monkeypatch.setattr(_ext, "load_cpu", lambda: None)
    assert resolve_backend("auto", "grouped_mm", "cpu") == "torch"
    with pytest.raises(BackendUnavailableError, match="'cpu_ext' was requested for grouped_mm"):
        resolve_backend("cpu_ext", "grouped_mm", "cpu")


def test_explicit_unavailable_backend_raises_from_the_op():
    x, w = torch.randn(4, 8), torch.randn(2, 8, 3)
    with pytest.raises(BackendUnavailableError, match="cuda_ext"):
        grouped_mm(x, w, torch.tensor([2, 4]), backend="cuda_ext")
    with pytest.raises(ValueError, match="offsets"):
        grouped_mm(x, w, torch.tensor([4]), backend="torch")


def test_auto_prefers_cuda_ext_then_triton(monkeypatch):
    """Resolution for CUDA inputs, with a stand-in extension (no GPU needed to decide)."""
    from megatron_evomoe.ops import _ext

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    fake = types.SimpleNamespace(permute=None, permute_backward=None)  # no grouped_mm functions
    monkeypatch.setattr(_ext, "load", lambda: fake)
    assert resolve_backend("auto", "permute", "cuda") == "cuda_ext"
    assert resolve_backend("auto", "grouped_mm", "cuda") == "measured"  # Triton vs torch, timed per shape
    with pytest.raises(BackendUnavailableError, match="no grouped_mm"):
        resolve_backend("cuda_ext", "grouped_mm", "cuda")
    monkeypatch.setattr(_ext, "load", lambda: None)
    assert resolve_backend("auto", "permute", "cuda") == "triton"
    monkeypatch.setattr(backend_mod, "triton_importable", lambda: (False, "no triton"))
    assert resolve_backend("auto", "permute", "cuda") == "torch"


class FakeTimer:
    """Fixed fake seconds per candidate name; runs each candidate once (so that it must work)."""

    def __init__(self, seconds):
        self.seconds, self.calls = seconds, []

    def __call__(self, name, fn):
        self.calls.append(name)
        fn()
        return self.seconds[name]


def test_measured_backend_runs_the_choice_per_phase_and_shape(monkeypatch, caplog):
    """backend "measured" (auto on CUDA), on CPU under the interpreter with fake timings: each phase
    times its candidates once per shape (the TMA variant only where TMA can load the operands), runs
    the fastest, logs one line per shape, and the gradients are right."""
    monkeypatch.setattr(ggo, "resolve_backend", lambda *args: "measured")
    monkeypatch.setattr(ggo.MEASURED, "choices", {})
    monkeypatch.setattr(ggo, "_grouped_mm_rejects", set())  # the refusals below stay in this test
    timer = FakeTimer({"triton_tma": 1.0, "triton": 2.0, "torch": 3.0})
    monkeypatch.setattr(ggo.MEASURED, "timer", timer)
    monkeypatch.setattr(ggo.MEASURED, "forbidden", lambda: False)
    tma_calls = []
    tma = ggo._tma_kernels()
    for name in ("grouped_mm_fwd_tma", "grouped_mm_dgrad_tma", "grouped_mm_wgrad_tma"):
        real = getattr(tma, name)
        monkeypatch.setattr(tma, name,
                            lambda *a, _real=real, _name=name, **k: tma_calls.append(_name) or _real(*a, **k))
    with caplog.at_level(logging.INFO, logger="megatron_evomoe.ops"):
        for _ in range(2):  # the second step times nothing and logs nothing
            check_autograd("measured", torch.float32, "cpu", counts=[9, 0, 14, 1, 0], tail=3, K=24, N=16)
    assert timer.calls == ["triton", "triton_tma", "torch"] * 3  # fwd, dgrad, wgrad
    # chosen: TMA in each phase (once timed + the 2 steps)
    assert sorted(tma_calls) == ["grouped_mm_dgrad_tma"] * 3 + ["grouped_mm_fwd_tma"] * 3 + ["grouped_mm_wgrad_tma"] * 3
    lines = [r.getMessage() for r in caplog.records if r.name == "megatron_evomoe.ops"]
    assert [line.split(":")[0] for line in lines] == [
        f"grouped_mm {phase} rows<=32 K=24 N=16 E=5 float32 on cpu" for phase in ("fwd", "dgrad", "wgrad")]
    assert [line.split("using ")[1].split(" ")[0] for line in lines] == ["triton_tma"] * 3

    # Another shape, where torch would be fastest: x rows of K=18 fp32 (72 bytes) can be loaded neither
    # by TMA nor by torch._grouped_mm (which needs 16-byte rows too): fwd times triton alone (torch
    # fails and is named), dgrad (dy: [T, 16], w: [E, 18, 16]) may use TMA, wgrad (x: [T, 18]) not.
    timer.seconds = {"triton_tma": 3.0, "triton": 2.0, "torch": 1.0}
    timer.calls.clear()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="megatron_evomoe.ops"):
        check_autograd("measured", torch.float32, "cpu", counts=[40, 30], tail=0, K=18, N=16)
    assert timer.calls == ["triton", "torch", "triton", "triton_tma", "torch", "triton", "torch"]
    assert {k.phase: v for k, v in ggo.MEASURED.choices.items() if k.rows == 128} == dict(
        fwd="triton", dgrad="triton", wgrad="triton")
    assert all("torch failed (NotImplementedError" in r.getMessage() for r in caplog.records)
    # and where every candidate runs, the fastest (torch here) serves all three phases
    check_autograd("measured", torch.float32, "cpu", counts=[40, 32], tail=0, K=16, N=16)
    assert {k.phase: v for k, v in ggo.MEASURED.choices.items() if k.k == 16} == dict(
        fwd="torch", dgrad="torch", wgrad="torch")


def test_choice_is_logged_once(caplog):
    backend_mod.reset_logged()
    x, w, off = torch.randn(4, 8), torch.randn(2, 8, 3), torch.tensor([2, 4])
    with caplog.at_level(logging.INFO, logger="megatron_evomoe.ops"):
        for _ in range(3):
            grouped_mm(x, w, off)
    msgs = [r.getMessage() for r in caplog.records if r.name == "megatron_evomoe.ops"]
    assert len(msgs) == 1 and "grouped_mm: using the cpu_ext backend on cpu" in msgs[0], msgs


@pytest.mark.parametrize("backend", ["torch", "triton", "cpu_ext"])
def test_opcheck(backend):
    x = torch.randn(10, 8, requires_grad=True)
    w = torch.randn(3, 8, 6, requires_grad=True)
    off = torch.tensor([4, 4, 9], dtype=torch.int32)
    dy = torch.randn(10, 6)
    for op, args in ((ggo.grouped_mm_op, (x, w, off, backend)),
                     (ggo.grouped_mm_dgrad_op, (dy, w.detach(), off, backend)),
                     (ggo.grouped_mm_wgrad_op, (x.detach(), dy, off, backend))):
        torch.library.opcheck(op, args)


def test_torch_compile_traces_the_ops():
    """fullgraph=True: no graph break in backend resolution, custom ops or their autograd."""
    x = torch.randn(10, 8, requires_grad=True)
    w = torch.randn(3, 8, 6, requires_grad=True)
    off = torch.tensor([4, 4, 9], dtype=torch.int32)
    f = torch.compile(lambda x, w: grouped_mm(x, w, off).square().sum(), fullgraph=True, backend="aot_eager")
    gx, gw = torch.autograd.grad(f(x, w), (x, w))
    gx_ref, gw_ref = torch.autograd.grad(reference(x, w, [4, 0, 5], 1).square().sum(), (x, w))
    torch.testing.assert_close(gx, gx_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_grouped_mm_autograd_cuda(backend, dtype):
    check_autograd(backend, dtype, "cuda", counts=[130, 0, 64, 1, 0, 257], tail=5, K=128, N=96)
