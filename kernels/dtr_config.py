"""Launch configuration of the DTR kernels (dtr_forward.py, dtr_backward.py): shape checks, padded
sizes and tiles, operand dtypes, the modality schedule, and the tables of the AOT report.

Padding: tl.arange and tl.dot want power-of-two sizes and dot dimensions >= 16, so H, D, E are padded
to HP, DP, EP >= 16 and R to RP (power of two) for the bilinear contraction (the dominant GEMM, where
padding would waste FLOPs) and to RA >= 16 where r is a dot dimension. Per-token vectors are moved
between the two r layouts through their global-memory copy (store, barrier, load), which is cheaper
than shuffling registers.

Modalities: tokens are grouped by modality (a stable argsort of ``mod`` on the host side, no
device sync: the grid is an upper bound, cdiv(T, BT) + M - 1 blocks, and each program finds its
modality and rows from the per-modality offsets in device memory). Every block then has a single
modality, so its weight tiles are plain 2-D tiles and no FLOPs are spent on the other modality's
hypernetwork. The alternative, computing the block with both modalities' weights and selecting
per row, doubles the dominant GEMM (z @ w2_down^T) for every block.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

NUM_MODALITIES = 2
ACTIVATIONS = {None: 0, "none": 0, "gelu": 1, "silu": 2}


def activation_id(activation) -> int:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of None, 'none', 'gelu', 'silu'; got {activation!r}")
    return ACTIVATIONS[activation]


# ============================================================================= shape checks

DTR_PARAM_NAMES = ("w1", "b1", "w2_down", "b2_down", "w2_up", "b2_up", "phi_w", "phi_b")


def dtr_dims(z, mod, w1, b1, w2_down, b2_down, w2_up, b2_up, phi_w, phi_b, top_k):
    """Validate shapes; returns (T, C, M, H, R, D, E). Raises ValueError naming the bad field."""
    if z.dim() != 2:
        raise ValueError(f"z must be [T, C]; got shape {tuple(z.shape)}")
    num_tokens, hidden = z.shape
    if mod.shape != (num_tokens,) or mod.dtype.is_floating_point or mod.dtype.is_complex:
        raise ValueError(f"mod must be an integer (or bool image-mask) tensor [T={num_tokens}]; "
                         f"got {tuple(mod.shape)} {mod.dtype}")
    if w1.dim() != 3 or w1.shape[2] != hidden:
        raise ValueError(f"w1 must be [M, H, C={hidden}]; got {tuple(w1.shape)}")
    num_mod, hyper = w1.shape[:2]
    if w2_down.dim() != 4 or w2_down.shape[0] != num_mod or w2_down.shape[1] != hyper \
            or w2_down.shape[3] != hidden or w2_down.shape[2] % 2:
        raise ValueError(f"w2_down must be [M={num_mod}, H={hyper}, 2R, C={hidden}]; got {tuple(w2_down.shape)}")
    rank = w2_down.shape[2] // 2
    if w2_up.dim() != 4 or w2_up.shape[0] != num_mod or w2_up.shape[1] != hyper or w2_up.shape[3] != rank:
        raise ValueError(f"w2_up must be [M={num_mod}, H={hyper}, D, R={rank}]; got {tuple(w2_up.shape)}")
    emb = w2_up.shape[2]
    if phi_w.dim() != 2 or phi_w.shape[1] != emb:
        raise ValueError(f"phi_w must be [E, D={emb}]; got {tuple(phi_w.shape)}")
    num_experts = phi_w.shape[0]
    expected = {"b1": (num_mod, hyper), "b2_down": (num_mod, 2 * rank, hidden), "b2_up": (num_mod, emb, rank),
                "phi_b": (num_experts,)}
    for name, t in (("b1", b1), ("b2_down", b2_down), ("b2_up", b2_up), ("phi_b", phi_b)):
        if tuple(t.shape) != expected[name]:
            raise ValueError(f"{name} must be {list(expected[name])}; got {list(t.shape)}")
    if not 1 <= int(top_k) <= num_experts:
        raise ValueError(f"top_k must be in [1, E={num_experts}]; got {top_k}")
    return num_tokens, hidden, num_mod, hyper, rank, emb, num_experts


# ============================================================================= tiles and schedule

@dataclass(frozen=True)
class DtrConfig:
    """Padded sizes and tiles (constexprs) of the DTR kernels for one router shape.

    HP, RP, DP, EP, KP: H, R, D, E, K padded to powers of two (HP, DP, EP >= 16: tl.dot dimensions);
    RA = max(16, RP): r where it is a tl.dot dimension. HJ hypernetwork rows per pass over C
    (NUM_J = HP / HJ passes), HJ*RP columns per bilinear accumulator. HJX, HJY, DC: chunks of j, j
    and d in the backward's small GEMMs over (j, d) and (d, r) (at most 64 columns each).
    BLOCK_T = 16 * num_warps tokens per program."""
    HP: int
    HJ: int
    NUM_J: int
    HJX: int
    HJY: int
    DC: int
    RP: int
    RA: int
    DP: int
    EP: int
    KP: int
    BLOCK_T: int
    BLOCK_C: int
    num_warps: int


def _pow2_at_least(n: int, floor: int = 1) -> int:
    return max(floor, triton.next_power_of_2(max(1, n)))


def dtr_config(H: int, R: int, D: int, E: int, K: int = 1, *, num_warps: int = 4, block_c: int = 64,
               acc_cols: int = 64, block_t: int | None = None) -> DtrConfig:
    """``acc_cols``: columns of each bilinear accumulator (HJ*RP), i.e. fp32 registers per thread
    at BLOCK_T = 16 * num_warps. ``block_t`` other than 16 * num_warps: interpreter tests only."""
    hp, rp, dp = _pow2_at_least(H, 16), _pow2_at_least(R), _pow2_at_least(D, 16)
    hj = min(hp, max(acc_cols // rp, 16 // rp, 1))  # powers of two; HJ*RP >= 16 (a tl.dot dimension)
    return DtrConfig(HP=hp, HJ=hj, NUM_J=hp // hj, HJX=min(hp, max(1, 64 // dp)), HJY=16,
                     DC=min(dp, max(16 // rp, 64 // rp, 1)), RP=rp,
                     RA=max(16, rp), DP=dp, EP=_pow2_at_least(E, 16), KP=_pow2_at_least(K),
                     BLOCK_T=block_t or 16 * num_warps, BLOCK_C=block_c, num_warps=num_warps)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dot_dtypes(z, *weights):
    """(operand dtype, tl.dot dtype, fp32 precision) of the C-sized GEMMs.

    bf16/fp16 tensor-core GEMMs with fp32 accumulation when z and the C-sized weights share that
    dtype (fp32 operands computed in the kernel, e.g. h (x) gu, are rounded to it, as a bf16 autograd
    GEMM would); fp32 otherwise, as 3xTF32 on GPU (close to fp32 accuracy, unlike plain TF32).
    Under TRITON_INTERPRET=1 bf16 operands are rounded to bf16 and then fed to tl.dot as fp32: the
    triton 3.9 interpreter keeps bf16 as uint16 and its tl.dot multiplies the raw bit patterns;
    bf16 values are exact in fp32, so the products are those of the GPU's bf16 MMA."""
    dtypes = {z.dtype, *(w.dtype for w in weights)}
    if len(dtypes) == 1 and z.dtype in (torch.bfloat16, torch.float16):
        op = tl.bfloat16 if z.dtype == torch.bfloat16 else tl.float16
        return op, (tl.float32 if (_interpreting() and op == tl.bfloat16) else op), "tf32"
    return tl.float32, tl.float32, "tf32x3"


def modality_schedule(mod: torch.Tensor, num_modalities: int):
    """perm [T] int32: token ids grouped by modality (stable); offsets [M+1] int32 (device, no sync)."""
    perm = torch.argsort(mod.to(torch.int32), stable=True).to(torch.int32)
    counts = torch.bincount(mod.reshape(-1).long(), minlength=num_modalities)[:num_modalities]
    offsets = torch.zeros(num_modalities + 1, dtype=torch.int32, device=mod.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return perm, offsets


def check_modality_ids(mod: torch.Tensor, num_modalities: int):
    """Out-of-range ids would silently drop tokens from the schedule: refuse them (async on CUDA and
    under torch.compile, where reading the flag on the host would break the graph)."""
    bad = (mod < 0) | (mod >= num_modalities)
    if mod.is_cuda or torch.compiler.is_compiling():
        torch._assert_async(~bad.any(), f"mod must hold modality ids in [0, {num_modalities})")
    elif mod.numel() and bool(bad.any()):
        raise ValueError(f"mod must hold modality ids in [0, {num_modalities}); "
                         f"got values {sorted(set(mod[bad].tolist()))[:5]}")


def contiguous_params(w1, b1, w2_down, b2_down, w2_up, b2_up, phi_w, phi_b):
    return [t.contiguous() for t in (w1, b1, w2_down, b2_down, w2_up, b2_up, phi_w, phi_b)]


KERNELS = ("fwd", "token", "dz", "dw_w2down", "dw_w1")


def default_config(kernel: str, H: int, R: int, D: int, E: int, K: int = 1, fp32: bool = False) -> DtrConfig:
    """The tiles each kernel launches with (those the AOT report checks for spills, sm_80 and sm_90).

    fp32 operands run as 3xTF32, whose hi/lo operand splits live in registers on sm_80: narrower
    C tiles and accumulators there."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}; got {kernel!r}")
    if kernel == "dw_w2down":
        return dtr_config(H, R, D, E, K, block_c=16 if fp32 else 64)
    if kernel == "dw_w1":
        return dtr_config(H, R, D, E, K, block_c=32)
    if kernel == "dz":
        return dtr_config(H, R, D, E, K, block_c=32 if fp32 else 64, acc_cols=32 if fp32 else 64)
    return dtr_config(H, R, D, E, K, block_c=16 if fp32 else 64, acc_cols=32 if fp32 else 64)


# ============================================================================= AOT report tables

# (H, R, D, E, K): the paper's router at the benchmark sizes, and a large one (bf16); the paper's in fp32
AOT_SHAPES = ((32, 8, 16, 4, 1), (64, 16, 64, 64, 2))
AOT_SHAPES_FP32 = ((32, 8, 16, 4, 1),)


def aot_configs(shapes, fp32):
    dt = tl.float32 if fp32 else tl.bfloat16
    common = dict(M=NUM_MODALITIES, ACT=0, OP_DTYPE=dt, DOT_DTYPE=dt, PRECISION="tf32x3" if fp32 else "tf32",
                  num_stages=2)
    out = {k: [] for k in KERNELS}
    for H, R, D, E, K in shapes:
        cfg = {k: default_config(k, H, R, D, E, K, fp32) for k in KERNELS}

        def tiles(c):
            return dict(common, H=H, R=R, HP=c.HP, HJ=c.HJ, NUM_J=c.NUM_J, RP=c.RP, RA=c.RA, BLOCK_T=c.BLOCK_T,
                        BLOCK_C=c.BLOCK_C, num_warps=c.num_warps)

        c = cfg["fwd"]
        out["fwd"].append(dict(tiles(c), D=D, E=E, K=K, DP=c.DP, EP=c.EP, KP=c.KP, RENORM=True))
        c = cfg["token"]
        out["token"].append(dict(tiles(c), D=D, HJX=c.HJX, HJY=c.HJY, DC=c.DC, DP=c.DP))
        out["dz"].append(tiles(cfg["dz"]))
        out["dw_w2down"].append(dict(tiles(cfg["dw_w2down"]), MODE=0))
        out["dw_w1"].append(dict(tiles(cfg["dw_w1"]), MODE=1))
    return out


# (name suffix, fp32 operands, shapes) of each registered variant
AOT_VARIANTS = (("", False, AOT_SHAPES), ("_fp32", True, AOT_SHAPES_FP32))


def aot_signatures(fp32: bool) -> dict[str, dict[str, str]]:
    """Runtime argument types of the DTR kernels: "fwd", "token", "dz" and "dw" (both dw modes)."""
    index = {"perm_ptr": "*i32", "off_ptr": "*i32", "C": "i32"}
    x = "*fp32" if fp32 else "*bf16"   # z and the router parameters
    f = "*fp32"

    def ptrs(t, *names):
        return {n: t for n in names}

    return {
        "fwd": {**index, **ptrs(x, "z_ptr", "w1_ptr", "b1_ptr", "w2d_ptr", "b2d_ptr", "w2u_ptr", "b2u_ptr",
                                "phiw_ptr", "phib_ptr"),
                **ptrs(f, "logits_ptr", "probs_ptr", "gates_ptr", "psum_ptr", "hpre_ptr", "u_ptr", "e_ptr"),
                "idx_ptr": "*i64", "cnt_ptr": "*i32"},
        "token": {**index, **ptrs(x, "z_ptr", "w2d_ptr", "w2u_ptr", "b2u_ptr"),
                  **ptrs(f, "ge_ptr", "hpre_ptr", "u_ptr", "gu_ptr", "ghpre_ptr")},
        "dz": {**index, **ptrs(x, "dz_ptr", "w1_ptr", "w2d_ptr", "b2d_ptr"),
               **ptrs(f, "hpre_ptr", "gu_ptr", "ghpre_ptr")},
        "dw": {**index, "z_ptr": x, "NUM_SPLITS": "i32",
               **ptrs(f, "hpre_ptr", "gu_ptr", "ghpre_ptr", "dw2d_ptr", "dw1_ptr", "db2d_ptr")},
    }


def register_dtr_aot(kernels) -> None:
    """Add ``kernels``, (name, @triton.jit fn, config key, signature key) tuples, to the AOT report
    (kernels/aot.py), once per variant of AOT_VARIANTS (the name takes the variant's suffix)."""
    from megatron_evomoe.kernels.aot import register_aot

    for suffix, fp32, shapes in AOT_VARIANTS:
        cfgs = aot_configs(shapes, fp32)
        sig = aot_signatures(fp32)
        # C is 16-divisible in every real model (and Triton specialises on it at run time)
        for name, fn, key, sig_key in kernels:
            register_aot(fn, sig[sig_key], cfgs[key], name=name + suffix, divisible_by_16=("C",))
