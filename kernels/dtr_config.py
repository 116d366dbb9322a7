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
    (NUM_J = HP / HJ passes), HJ*RP columns per bilinear accumulator. HK hypernetwork rows per chunk
    of the GEMMs over h itself (w1 z, ghpre @ w1, ghpre^T z; NUM_H = HP / HK chunks): an [BT, HP]
    accumulator at HP = 256 is 128 fp32 registers per thread, which spilled. HJX, HJY, DC: chunks
    of j, j and d in the backward's small GEMMs over (j, d) and (d, r) (at most 64 columns each).
    BLOCK_T = 16 * num_warps tokens per program."""
    HP: int
    HJ: int
    NUM_J: int
    HK: int
    NUM_H: int
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
               acc_cols: int = 64, h_cols: int = 64, block_t: int | None = None) -> DtrConfig:
    """``acc_cols``: columns of each bilinear accumulator (HJ*RP), i.e. fp32 registers per thread
    at BLOCK_T = 16 * num_warps; ``h_cols``: HK. ``block_t`` other than 16 * num_warps: interpreter tests only."""
    hp, rp, dp = _pow2_at_least(H, 16), _pow2_at_least(R), _pow2_at_least(D, 16)
    hj = min(hp, max(acc_cols // rp, 16 // rp, 1))  # powers of two; HJ*RP >= 16 (a tl.dot dimension)
    hk = min(hp, max(16, h_cols))
    return DtrConfig(HP=hp, HJ=hj, NUM_J=hp // hj, HK=hk, NUM_H=hp // hk, HJX=min(hp, max(1, 64 // dp)), HJY=16,
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

# (kernel, fp32 operands) -> dtr_config tiles: the one table the launchers pick from and the AOT report
# compiles (at every shape of AOT_SHAPES; tests/kernels/test_dtr_kernel.py checks that the launchers
# pick nothing else). fp32 operands run as 3xTF32, whose hi/lo operand splits live in registers on
# sm_80: narrower C tiles, accumulators and h chunks there. The bf16 token kernel holds P, gu and the (d, r)
# tiles at once: 32-wide C tiles keep it under 255 registers at rank 16 on sm_80.
TILES = {
    ("fwd", False): dict(block_c=64, acc_cols=64), ("fwd", True): dict(block_c=16, acc_cols=32, h_cols=16),
    ("token", False): dict(block_c=32, acc_cols=64), ("token", True): dict(block_c=16, acc_cols=32),
    ("dz", False): dict(block_c=64, acc_cols=64), ("dz", True): dict(block_c=32, acc_cols=32, h_cols=32),
    ("dw_w2down", False): dict(block_c=64), ("dw_w2down", True): dict(block_c=16),
    ("dw_w1", False): dict(block_c=32), ("dw_w1", True): dict(block_c=16, h_cols=32),
}
# ... except at H <= 32 (one h chunk), where the fp32 dw_w1 keeps 32-wide C tiles (16 spilled on sm_90)
TILES_NARROW = {("dw_w1", True): dict(block_c=32, h_cols=32)}


def default_config(kernel: str, H: int, R: int, D: int, E: int, K: int = 1, fp32: bool = False) -> DtrConfig:
    """The tiles each kernel launches with (TILES: those the AOT report checks for spills, sm_80 and sm_90)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}; got {kernel!r}")
    key = (kernel, bool(fp32))
    return dtr_config(H, R, D, E, K, **(TILES_NARROW.get(key, TILES[key]) if H <= 32 else TILES[key]))


# ============================================================================= AOT report tables

# (H, R, D, E, K) the AOT report compiles, in fp32 and in bf16: the recipe's routers (hypernetwork
# width 16/64/128/256, rank 8/16, D = 16, E = 4, top-2 and top-1), then the benchmark's (H = 32 and a
# large D, E). The hidden size C (2048/2560/4096 in the recipe) is a runtime loop bound: it adds no
# compiled variant; K is a constexpr of the forward only (aot_configs drops repeated configs). The
# first AOT_CI_CONFIGS configs of each kernel (the widest H at rank 16, the narrowest at rank 8, top-2:
# the most registers, and the paper's A100 router) are what CI compiles (``--max-configs``);
# ``--check`` without it compiles them all.
RECIPE_HIDDEN = (2048, 2560, 4096)
RECIPE_WIDTHS = (16, 64, 128, 256)
RECIPE_RANKS = (8, 16)
RECIPE_SHAPES = tuple((H, R, 16, 4, K) for H in RECIPE_WIDTHS for R in RECIPE_RANKS for K in (2, 1))
_CI_SHAPES = ((256, 16, 16, 4, 2), (16, 8, 16, 4, 2))
AOT_SHAPES = _CI_SHAPES + tuple(s for s in RECIPE_SHAPES if s not in _CI_SHAPES) + ((32, 8, 16, 4, 1),
                                                                                   (64, 16, 64, 64, 2))
AOT_CI_CONFIGS = len(_CI_SHAPES)


def aot_configs(shapes, fp32):
    """kernel -> its distinct constexpr configs over ``shapes`` (first occurrence order)."""
    dt = tl.float32 if fp32 else tl.bfloat16
    common = dict(M=NUM_MODALITIES, ACT=0, OP_DTYPE=dt, DOT_DTYPE=dt, PRECISION="tf32x3" if fp32 else "tf32",
                  num_stages=2)
    out = {k: [] for k in KERNELS}
    for H, R, D, E, K in shapes:
        cfg = {k: default_config(k, H, R, D, E, K, fp32) for k in KERNELS}

        def tiles(c, *extra):
            return dict(common, H=H, R=R, HP=c.HP, HJ=c.HJ, NUM_J=c.NUM_J, RP=c.RP, RA=c.RA, BLOCK_T=c.BLOCK_T,
                        BLOCK_C=c.BLOCK_C, num_warps=c.num_warps, **{n: getattr(c, n) for n in extra})

        c = cfg["fwd"]
        found = dict(fwd=dict(tiles(c, "HK", "NUM_H", "DP", "EP", "KP"), D=D, E=E, K=K, RENORM=True),
                     token=dict(tiles(cfg["token"], "HJX", "HJY", "DC", "DP"), D=D),
                     dz=tiles(cfg["dz"], "HK", "NUM_H"),
                     dw_w2down=dict(tiles(cfg["dw_w2down"], "HK", "NUM_H"), MODE=0),
                     dw_w1=dict(tiles(cfg["dw_w1"], "HK", "NUM_H"), MODE=1))
        for k, config in found.items():
            if config not in out[k]:
                out[k].append(config)
    return out


# (name suffix, fp32 operands, shapes) of each registered variant
AOT_VARIANTS = (("", False, AOT_SHAPES), ("_fp32", True, AOT_SHAPES))


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
