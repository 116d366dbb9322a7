"""Fused DTR kernels (kernels/dtr_forward.py, kernels/dtr_backward.py) against their PyTorch references
(kernels/dtr_reference.py).

Runs the Triton kernels under TRITON_INTERPRET=1 on CPU (tests/conftest.py); the ``gpu`` variants
run the same checks on CUDA tensors (compiled when TRITON_INTERPRET=0)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from megatron_evomoe.kernels import dtr_backward as kb  # noqa: E402
from megatron_evomoe.kernels import dtr_config as kc  # noqa: E402
from megatron_evomoe.kernels import dtr_forward as kf  # noqa: E402
from megatron_evomoe.kernels import dtr_reference as kref  # noqa: E402
from tests.kernels.poison import poisoned_empty  # noqa: E402

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
M = 2


def make_params(H, R, D, E, C, dtype=torch.float32, device="cpu", seed=0):
    """Router parameters scaled so that h, u, e and the logits are O(1)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape, std: torch.randn(*shape, generator=g) * std  # noqa: E731
    params = dict(
        w1=rnd(M, H, C, std=C ** -0.5), b1=rnd(M, H, std=0.5),
        w2_down=rnd(M, H, 2 * R, C, std=0.5 * (C * H) ** -0.5), b2_down=rnd(M, 2 * R, C, std=0.5 * C ** -0.5),
        w2_up=rnd(M, H, D, R, std=0.5 * (H * R) ** -0.5), b2_up=rnd(M, D, R, std=0.5 * R ** -0.5),
        phi_w=rnd(E, D, std=D ** -0.5), phi_b=rnd(E, std=0.5),
    )
    return [p.to(device=device, dtype=dtype) for p in params.values()]


def make_inputs(T, C, layout, dtype=torch.float32, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(T, C, generator=g).to(device=device, dtype=dtype)
    if layout == "mixed":
        mod = torch.randint(0, M, (T,), generator=g)
    elif layout == "alternating":  # every token block holds both modalities
        mod = torch.arange(T) % 2
    elif layout == "text":
        mod = torch.zeros(T, dtype=torch.long)
    else:
        mod = torch.ones(T, dtype=torch.long)
    return z, mod.to(device)


@pytest.fixture
def poison(monkeypatch):
    """Every kernel output starts as NaN (floats) or -7 (ints): a missed element shows up."""
    monkeypatch.setattr(kf, "_empty", poisoned_empty)
    monkeypatch.setattr(kb, "_empty", poisoned_empty)
    from megatron_evomoe.kernels import topk_softmax as kts
    monkeypatch.setattr(kts, "_empty", poisoned_empty)


def assert_rel(actual, expected, limit, name):
    """max |actual - expected| <= limit * max |expected| (gradients: elementwise rtol is meaningless near 0)."""
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    scale = expected.float().abs().max().clamp_min(1e-6)
    err = float((actual.float() - expected.float()).abs().max() / scale)
    assert err <= limit, f"{name}: relative error {err:.2e} > {limit:.0e}"


def assert_close(actual, expected, rtol, atol, name):
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


# ------------------------------------------------------------------------------- references

@pytest.mark.parametrize("activation", [None, "gelu", "silu"])
def test_bilinear_reference_equals_materialized(activation):
    ps = make_params(H=5, R=3, D=4, E=6, C=24)
    z, mod = make_inputs(29, 24, "mixed")
    zb = z.clone().requires_grad_()
    pb = [p.clone().requires_grad_() for p in ps]
    zm = z.clone().requires_grad_()
    pm = [p.clone().requires_grad_() for p in ps]
    bil = kref.dtr_reference_bilinear(zb, mod, *pb, 2, True, activation)
    mat = kref.dtr_reference_materialized(zm, mod, *pm, 2, True, activation)
    for name, a, b in zip(("logits", "probs", "topk_idx", "gates", "prob_sum", "counts"), bil, mat):
        if a.dtype.is_floating_point:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
        else:
            assert torch.equal(a, b), name
    assert int(bil[5].sum()) == 29 * 2
    w = torch.randn_like(bil[0])
    ((bil[0] * w).sum() + bil[3].sum() * 0.5).backward()
    ((mat[0] * w).sum() + mat[3].sum() * 0.5).backward()
    for name, a, b in zip(["z"] + list(kc.DTR_PARAM_NAMES), [zb] + pb, [zm] + pm):
        assert_rel(a.grad, b.grad, 1e-5, f"d{name}")


def test_reference_matches_dumb_per_token_loop():
    H, R, D, E, C = 4, 2, 3, 5, 16
    ps = make_params(H, R, D, E, C)
    w1, b1, w2d, b2d, w2u, b2u, phw, phb = ps
    z, mod = make_inputs(9, C, "mixed")
    logits = kref.dtr_reference_bilinear(z, mod, *ps, 1)[0]
    for t in range(9):
        m = int(mod[t])
        h = w1[m] @ z[t] + b1[m]
        theta_down = sum(h[j] * w2d[m, j] for j in range(H)) + b2d[m]       # [2R, C]
        u = theta_down @ z[t]
        a = F.silu(u[:R]) * u[R:]
        theta_up = sum(h[j] * w2u[m, j] for j in range(H)) + b2u[m]         # [D, R]
        torch.testing.assert_close(logits[t], phw @ (theta_up @ a) + phb, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------- forward

def small_tiles(H, R, D, E, K=1):
    """16-token blocks and narrow accumulators: several blocks per modality, several j chunks
    (NUM_J > 1) and h chunks (NUM_H > 1, the last one partial or empty when H > 16) even at test sizes.
    The default tiles (64-token blocks) are tested too."""
    return kc.dtr_config(H, R, D, E, K, block_t=16, block_c=32, acc_cols=32, h_cols=16)


def wide_tiles(H, R, D, E, K=1):
    """The recipe's wide hypernetworks (H >= 128) with their production chunking (64-row h chunks,
    64-column accumulators) and 16-token blocks (fewer interpreted programs)."""
    return kc.dtr_config(H, R, D, E, K, block_t=16, block_c=32, acc_cols=64, h_cols=64)


TILES = {"small": small_tiles, "wide": wide_tiles, "default": lambda *shape: None}


FWD_CASES = [
    # (T, C, H, R, D, E, K, layout, dtype, tiles)
    (37, 40, 6, 3, 5, 6, 1, "mixed", torch.float32, "small"),
    (37, 40, 6, 3, 5, 6, 2, "alternating", torch.float32, "default"),
    (21, 33, 20, 4, 8, 8, 4, "text", torch.float32, "small"),
    (21, 33, 20, 4, 8, 8, 2, "image", torch.float32, "default"),
    (45, 48, 40, 2, 17, 4, 2, "mixed", torch.float32, "small"),
    (70, 40, 6, 3, 5, 6, 2, "mixed", torch.float32, "default"),     # > 64 tokens: several default blocks
    (37, 64, 16, 8, 16, 4, 1, "mixed", torch.bfloat16, "small"),
    (30, 40, 6, 3, 5, 6, 4, "alternating", torch.bfloat16, "default"),
    (21, 32, 6, 3, 5, 6, 2, "image", torch.float16, "default"),
    (24, 32, 128, 16, 16, 4, 2, "mixed", torch.float32, "wide"),     # the recipe's widest class, rank 16
]


def _fwd_check(T, C, H, R, D, E, K, layout, dtype, tiles, device, activation=None):
    ps = make_params(H, R, D, E, C, dtype, device)
    z, mod = make_inputs(T, C, layout, dtype, device)
    config = TILES[tiles](H, R, D, E, K)
    if config is not None:
        assert config.NUM_J > 1 or H <= 8, "small tiles should chunk the hypernetwork rows"
        assert config.NUM_H > 1 or H <= 16, "and the rows of w1"
    out = kf.dtr_forward_triton(z, mod, *ps, K, True, activation, config=config)
    ref = kref.dtr_reference_bilinear(z, mod, *ps, K, True, activation)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    for name, i in (("logits", 0), ("probs", 1), ("prob_sum", 4)):
        assert_close(out[i], ref[i], name=name, **tol)
    idx, ref_idx = out[2], ref[2]
    assert idx.dtype == torch.int64 and idx.shape == (T, K)
    # identical indices wherever the reference's consecutive top-(k+1) probabilities are not near-tied
    top = torch.topk(ref[1], min(K + 1, E), dim=-1).values
    gap = (top[:, :-1] - top[:, 1:]).min(dim=-1).values if top.shape[1] > 1 else torch.ones(T)
    clear = gap > (1e-5 if dtype == torch.float32 else 5e-3)
    assert clear.float().mean() > 0.75, "test inputs are too tied to be meaningful"
    assert torch.equal(idx[clear], ref_idx[clear])
    assert_close(out[3][clear], ref[3][clear], name="gates", **tol)
    assert out[5].dtype == torch.int64 and int(out[5].sum()) == T * K
    if dtype == torch.float32:
        assert torch.equal(out[5], ref[5])
    # saved pre-activation h for the backward
    zf = z.float()
    for t in (0, T - 1):
        m = int(mod[t])
        torch.testing.assert_close(out[6][t], ps[0][m].float() @ zf[t] + ps[1][m].float(), **tol)
    return out, ref


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", FWD_CASES,
                         ids=lambda c: f"T{c[0]}-C{c[1]}-H{c[2]}-R{c[3]}-k{c[6]}-{c[7]}-{str(c[8])[6:]}-{c[9]}")
def test_forward_matches_reference(case, device, poison):
    _fwd_check(*case, device=device)


@pytest.mark.parametrize("activation", ["gelu", "silu"])
def test_forward_activation(activation, poison):
    _fwd_check(23, 32, 6, 3, 5, 6, 2, "mixed", torch.float32, "small", "cpu", activation=activation)


@pytest.mark.parametrize("num_tokens,as_bool", [(37, False), (20, True)])
def test_forward_is_deterministic_and_takes_a_bool_image_mask(num_tokens, as_bool):
    """The same call twice gives the same bits; a bool image mask routes as the modality ids do."""
    ps = make_params(6, 3, 5, 6, 40)
    z, mod = make_inputs(num_tokens, 40, "mixed")
    a = kf.dtr_forward_triton(z, mod.bool() if as_bool else mod, *ps, 2)
    b = kf.dtr_forward_triton(z, mod, *ps, 2)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_modality_flag_changes_only_its_token():
    ps = make_params(6, 3, 5, 6, 40)
    z, mod = make_inputs(37, 40, "mixed")
    flipped = mod.clone()
    flipped[11] = 1 - flipped[11]
    for fn in (lambda m: kf.dtr_forward_triton(z, m, *ps, 2)[0],
               lambda m: kref.dtr_reference_bilinear(z, m, *ps, 2)[0]):
        before, after = fn(mod), fn(flipped)
        diff = (before - after).abs().amax(dim=1)
        assert diff[11] > 1e-2, "token 11's logits must follow its modality"
        others = torch.ones(37, dtype=torch.bool)
        others[11] = False
        assert diff[others].max() <= 1e-6, "other tokens' logits must not move"
        # and token 11 now matches the other modality's hypernetwork
    ref_other = kref.dtr_reference_bilinear(z[11:12], flipped[11:12], *ps, 2)[0]
    torch.testing.assert_close(kf.dtr_forward_triton(z, flipped, *ps, 2)[0][11:12], ref_other, rtol=1e-4, atol=1e-5)


def test_empty_and_single_token():
    ps = make_params(6, 3, 5, 6, 40)
    z, mod = make_inputs(0, 40, "mixed")
    out = kf.dtr_forward_triton(z, mod, *ps, 2)
    assert out[0].shape == (0, 6) and out[2].shape == (0, 2)
    assert torch.equal(out[4], torch.zeros(6)) and torch.equal(out[5], torch.zeros(6, dtype=torch.int64))
    grads = kb.dtr_backward_triton(torch.zeros(0, 6), z, mod, *ps, out[6], out[7], out[8])
    assert grads[0].shape == (0, 40) and all(torch.equal(g, torch.zeros_like(p)) for g, p in zip(grads[1:], ps))
    z, mod = make_inputs(1, 40, "image")
    _ = kf.dtr_forward_triton(z, mod, *ps, 2)
    torch.testing.assert_close(_[0], kref.dtr_reference_bilinear(z, mod, *ps, 2)[0], rtol=1e-4, atol=1e-5)


def test_bad_inputs_raise_naming_the_field():
    ps = make_params(6, 3, 5, 6, 40)
    z, mod = make_inputs(8, 40, "mixed")
    with pytest.raises(ValueError, match="mod must hold modality ids"):
        kf.dtr_forward_triton(z, mod + 1, *ps, 2)
    bad = list(ps)
    bad[3] = bad[3][:, :-1]
    with pytest.raises(ValueError, match="b2_down"):
        kf.dtr_forward_triton(z, mod, *bad, 2)
    with pytest.raises(ValueError, match="top_k"):
        kf.dtr_forward_triton(z, mod, *ps, 7)
    with pytest.raises(ValueError, match="activation"):
        kf.dtr_forward_triton(z, mod, *ps, 2, True, "relu")


# ------------------------------------------------------------------------------- backward

BWD_CASES = [
    # (T, C, H, R, D, E, layout, dtype, activation, num_splits, tiles)
    (37, 40, 6, 3, 5, 6, "mixed", torch.float32, None, 1, "small"),
    (50, 70, 20, 8, 16, 4, "alternating", torch.float32, "gelu", 2, "default"),
    (45, 33, 40, 2, 3, 3, "text", torch.float32, "silu", 3, "default"),
    (70, 40, 6, 3, 5, 6, "mixed", torch.float32, None, 2, "small"),
    (30, 64, 16, 4, 8, 4, "mixed", torch.bfloat16, None, 2, "small"),
    (24, 32, 128, 16, 16, 4, "mixed", torch.float32, None, 2, "wide"),  # 2 h chunks, 32 j chunks, rank 16
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", BWD_CASES,
                         ids=lambda c: f"T{c[0]}-H{c[2]}-R{c[3]}-{c[6]}-{str(c[7])[6:]}-{c[8]}-s{c[9]}-{c[10]}")
def test_backward_matches_autograd(case, device, poison):
    T, C, H, R, D, E, layout, dtype, activation, splits, tiles = case
    ps = make_params(H, R, D, E, C, dtype, device)
    z, mod = make_inputs(T, C, layout, dtype, device)
    zr = z.clone().requires_grad_()
    pr = [p.clone().requires_grad_() for p in ps]
    logits = kref.dtr_logits_bilinear(zr, mod, *pr, activation)
    grad_logits = torch.randn(logits.shape, generator=torch.Generator().manual_seed(3)).to(device)
    (logits * grad_logits).sum().backward()
    config = TILES[tiles](H, R, D, E)
    out = kf.dtr_forward_triton(z, mod, *ps, 1, True, activation, config=config)
    grads = kb.dtr_backward_triton(grad_logits, z, mod, *ps, out[6], out[7], out[8], activation,
                                   num_splits=splits, config=config)
    refs = [zr.grad] + [p.grad for p in pr]
    for name, g, r, p in zip(["z"] + list(kc.DTR_PARAM_NAMES), grads, refs, [z] + ps):
        assert g.dtype == p.dtype and g.shape == p.shape, name
        assert_rel(g, r, 1e-5 if dtype == torch.float32 else 2e-2, f"d{name}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_model_sized_forward_backward_cuda(dtype):
    """The paper's router sizes (H=32, R=8, D=16, E=4) at a few thousand tokens, default tiles (compiled
    when TRITON_INTERPRET=0): forward and every gradient against the reference."""
    T, C, H, R, D, E = 3000, 512, 32, 8, 16, 4
    ps = make_params(H, R, D, E, C, dtype, "cuda")
    z, mod = make_inputs(T, C, "mixed", dtype, "cuda")
    out = kf.dtr_forward_triton(z, mod, *ps, 1)
    zr = z.clone().requires_grad_()
    pr = [p.clone().requires_grad_() for p in ps]
    ref = kref.dtr_reference_bilinear(zr, mod, *pr, 1)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert_rel(out[0], ref[0].detach(), tol, "logits")
    assert_rel(out[1], ref[1].detach(), tol, "probs")
    agree = (out[2] == ref[2]).float().mean()
    assert agree > (0.999 if dtype == torch.float32 else 0.99), f"top-1 agreement {agree:.4f}"
    grad_logits = torch.randn(T, E, device="cuda")
    (ref[0] * grad_logits).sum().backward()
    grads = kb.dtr_backward_triton(grad_logits, z, mod, *ps, *out[6:])
    for name, g, r in zip(["z"] + list(kc.DTR_PARAM_NAMES), grads, [zr] + pr):
        assert_rel(g, r.grad, 1e-4 if dtype == torch.float32 else 3e-2, f"d{name}")


def test_backward_skips_what_is_not_needed():
    ps = make_params(6, 3, 5, 6, 40)
    z, mod = make_inputs(20, 40, "mixed")
    out = kf.dtr_forward_triton(z, mod, *ps, 1)
    g = torch.randn(20, 6)
    full = kb.dtr_backward_triton(g, z, mod, *ps, *out[6:])
    only_dz = kb.dtr_backward_triton(g, z, mod, *ps, *out[6:], need_dparams=False)
    assert all(x is None for x in only_dz[1:]) and torch.equal(only_dz[0], full[0])
    only_p = kb.dtr_backward_triton(g, z, mod, *ps, *out[6:], need_dz=False)
    assert only_p[0] is None and all(torch.equal(a, b) for a, b in zip(only_p[1:], full[1:]))


# ------------------------------------------------------------------------------- launch configs vs the AOT report

class _LaunchRecorder:
    """Stands in for a @triton.jit kernel: records the constexprs and launch options of each launch."""

    def __init__(self, name, calls):
        self.name, self.calls = name, calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            name = self.name if self.name != "dw" else ("dtr_bwd_dw_w2down", "dtr_bwd_dw_w1")[kwargs["MODE"]]
            self.calls.append((name, kwargs))
        return launch


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_launchers_pick_only_configs_the_aot_report_compiles(dtype, monkeypatch):
    """At every recipe shape (hypernetwork width x rank x top-k), each DTR launch's constexprs and
    options are exactly one of the configs registered for the AOT report (what `--check` proves
    spill-free on sm_80 and sm_90). The hidden size is a runtime argument of every kernel, so it
    adds no variant (C below is small; the recipe's 2048 / 2560 / 4096 compile to the same code)."""
    from megatron_evomoe.kernels import aot

    calls = []
    monkeypatch.setattr(kf, "_dtr_fwd_kernel", _LaunchRecorder("dtr_fwd", calls))
    for attr, name in (("_dtr_bwd_token_kernel", "dtr_bwd_token"), ("_dtr_bwd_dz_kernel", "dtr_bwd_dz"),
                       ("_dtr_bwd_dw_kernel", "dw")):
        monkeypatch.setattr(kb, attr, _LaunchRecorder(name, calls))
    monkeypatch.setattr(kc, "_interpreting", lambda: False)   # the GPU's operand dtypes
    suffix = "" if dtype == torch.bfloat16 else "_fp32"
    registry = aot.registered()
    for sig in kc.aot_signatures(dtype == torch.float32).values():
        assert sig["C"] == "i32"
    T, C = 8, 32
    z, mod = make_inputs(T, C, "alternating", dtype)
    for H, R, D, E, K in kc.RECIPE_SHAPES:
        ps = [torch.zeros(s, dtype=dtype) for s in ((M, H, C), (M, H), (M, H, 2 * R, C), (M, 2 * R, C),
                                                    (M, H, D, R), (M, D, R), (E, D), (E,))]
        del calls[:]
        out = kf.dtr_forward_triton(z, mod, *ps, K)
        kb.dtr_backward_triton(torch.zeros(T, E), z, mod, *ps, *out[6:])
        assert sorted(n for n, _ in calls) == sorted(["dtr_fwd", "dtr_bwd_token", "dtr_bwd_dz", "dtr_bwd_dw_w2down",
                                                      "dtr_bwd_dw_w1"])
        for name, launched in calls:
            assert launched in registry[name + suffix].configs, \
                f"{name}{suffix} at H={H} R={R} K={K}: launch config not in the AOT report: {launched}"
