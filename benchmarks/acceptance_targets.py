"""The GPU acceptance run's targets (issue 15), computed from each part's output, and its markdown report.

Each `*_targets(path)` reads one part's JSON (or junit XML) and returns rows
{"target": text, "measured": number or None, "threshold": ">= x" or "<= x", "met": bool, "detail": text};
a missing file or row gives measured None, met False and says what is missing, so a part that
failed or timed out still shows up in the report.
"""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

RECIPE_GEMM = "EvoMoE-2B"  # bench_grouped_gemm.py / bench_permute.py name of the recipe's expert shapes
RECIPE_DTR = "paper (EvoMoE DTR)"  # bench_router.py: 16k tokens, C=2048, H=32, R=8, D=16, E=4, top-1
OUR_PERMUTE = ("triton", "cuda_ext")
COPY = "device copy (same bytes)"


# What the scorers below read from each output: (table title or None for top-level keys, fields).
READS = {
    "grouped_gemm.json": ("grouped_gemm", ("model", "load", "proj", "pass", "method", "TFLOP/s")),
    "dtr.json": ("dtr", ("shape", "method", "fwd ms", "fwd+bwd ms")),
    "permute.json": ("permute", ("model", "pass", "method", "GB/s")),
    "train_step.json": (None, ("device", "params_active", "params_total", "micro_batch", "seq_len", "step_s",
                               "tokens_per_s", "tflops_per_s", "peak_tflops", "peak_mem_gib", "mfu")),
}


def unreadable(path: Path) -> str:
    """Why the scorer could not read `path` (a smoke run's output), "" when it can."""
    if not path.is_file():
        return f"no {path.name} written"
    title, fields = READS[path.name]
    data = json.loads(path.read_text())
    records = [data] if title is None else data.get("tables", {}).get(title, [])
    if not records:
        return f"{path.name} has no '{title}' rows"
    lacking = [f for f in fields if f not in records[0]]
    return f"{path.name} lacks {', '.join(lacking)}" if lacking else ""


def row(target: str, measured, threshold: float, detail: str = "", at_most: bool = False) -> dict:
    """met: measured >= threshold (at_most: <=); never met when nothing was measured."""
    met = measured is not None and (measured <= threshold if at_most else measured >= threshold)
    return {"target": target, "measured": measured, "threshold": f"{'<=' if at_most else '>='} {threshold:g}",
            "met": met, "detail": detail}


def _table(path: Path, title: str) -> list[dict]:
    if not path.is_file():
        return []
    return json.loads(path.read_text()).get("tables", {}).get(title, [])


def pytest_targets(path: Path) -> list[dict]:
    """junit XML of `pytest -m gpu`: every collected GPU test passes and none is skipped."""
    if not path.is_file():
        return [row("pytest -m gpu: all pass", None, 1.0, f"no {path.name}")]
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    detail = f"{passed} passed, {n['failures']} failed, {n['errors']} errors, {n['skipped']} skipped"
    share = passed / n["tests"] if n["tests"] else None
    return [row("pytest -m gpu: share of GPU tests passing (compiled kernels)", share, 1.0, detail)]


def grouped_gemm_targets(path: Path) -> list[dict]:
    """Our Triton grouped GEMM at the recipe's expert shapes, balanced loads, up and down, fwd and bwd:
    the worst ratio of TFLOP/s to the dense GEMM of equal FLOPs (cuBLAS) and to torch._grouped_mm."""
    rows = [r for r in _table(path, "grouped_gemm") if r["model"] == RECIPE_GEMM and r["load"] == "balanced"]
    vs_dense, vs_torch, cases = [], [], []
    for case in {(r["proj"], r["pass"]) for r in rows}:
        tf = {r["method"]: r["TFLOP/s"] for r in rows if (r["proj"], r["pass"]) == case}
        ours = tf.get("triton (ours)")
        if ours is None:
            continue
        cases.append(f"{case[0]} {case[1]}: {ours} TFLOP/s")
        if tf.get("dense GEMM (same FLOPs)"):
            vs_dense.append(ours / tf["dense GEMM (same FLOPs)"])
        if tf.get("torch._grouped_mm"):
            vs_torch.append(ours / tf["torch._grouped_mm"])
    detail = "; ".join(sorted(cases)) or f"no '{RECIPE_GEMM}' rows of 'triton (ours)' in {path.name}"
    return [row(f"grouped GEMM / dense cuBLAS, equal FLOPs ({RECIPE_GEMM}, worst case)",
                min(vs_dense, default=None), 0.85, detail),
            row(f"grouped GEMM / torch._grouped_mm ({RECIPE_GEMM}, worst case)", min(vs_torch, default=None), 1.0,
                detail if vs_torch or not cases else f"torch._grouped_mm did not run; {detail}")]


def dtr_targets(path: Path) -> list[dict]:
    """Fused DTR vs eager PyTorch DTR at 16k tokens: speed-up of forward + backward (and forward)."""
    rows = {r["method"]: r for r in _table(path, "dtr") if r["shape"] == RECIPE_DTR}
    fused, eager = rows.get("fused"), rows.get("eager")

    def speedup(col):
        return eager[col] / fused[col] if fused and eager and fused[col] and eager[col] else None

    detail = (f"fwd+bwd: eager {eager['fwd+bwd ms']} ms, fused {fused['fwd+bwd ms']} ms; fwd speed-up "
              f"{speedup('fwd ms'):.2f}x" if speedup("fwd ms") and speedup("fwd+bwd ms")
              else f"no fused and eager '{RECIPE_DTR}' rows in {path.name}")
    return [row("fused DTR / eager, forward + backward, 16k tokens", speedup("fwd+bwd ms"), 3.0, detail)]


def permute_targets(path: Path) -> list[dict]:
    """Permute / unpermute (forward and backward) of our best backend as a share of the bandwidth of a
    device-to-device copy of the same bytes; the worst of the four passes."""
    rows = [r for r in _table(path, "permute") if r["model"] == RECIPE_GEMM]
    shares, cases = [], []
    for p in sorted({r["pass"] for r in rows}):
        gbs = {r["method"]: r["GB/s"] for r in rows if r["pass"] == p}
        ours = max((gbs[m] for m in OUR_PERMUTE if gbs.get(m)), default=None)
        if ours is None or not gbs.get(COPY):
            continue
        shares.append(ours / gbs[COPY])
        cases.append(f"{p}: {ours:.0f} of {gbs[COPY]:.0f} GB/s")
    detail = "; ".join(cases) or f"no '{RECIPE_GEMM}' rows of {' / '.join(OUR_PERMUTE)} in {path.name}"
    return [row("permute / device-to-device copy bandwidth (worst pass)", min(shares, default=None), 0.70, detail)]


def train_targets(path: Path) -> list[dict]:
    """MFU of the timed steps, then the host syncs of the step under sync-debug mode (the same JSON)."""
    return _mfu_target(path) + sync_targets(path)


def _mfu_target(path: Path) -> list[dict]:
    r = json.loads(path.read_text()) if path.is_file() else {}
    if "tokens_per_s" not in r:
        return [row("MFU of the ~1B-active bf16 training step", None, 0.45, f"no step measured in {path.name}")]
    memory = "" if r["peak_mem_gib"] is None else f", peak memory {r['peak_mem_gib']:.1f} GiB"
    detail = (f"{r['device']}: {r['params_active'] / 1e9:.2f}B active / {r['params_total'] / 1e9:.2f}B parameters, "
              f"{r['micro_batch']} x {r['seq_len']} tokens, step {r['step_s'] * 1e3:.1f} ms, "
              f"{r['tokens_per_s']:.0f} tokens/s, {r['tflops_per_s']:.1f} TFLOP/s of {r['peak_tflops']} peak{memory}")
    return [row("MFU of the ~1B-active bf16 training step", r.get("mfu"), 0.45, detail)]


def sync_targets(path: Path) -> list[dict]:
    r = json.loads(path.read_text()).get("syncs_per_step") if path.is_file() else None
    if r is None:
        return [row("host syncs in the MoE layer per step (outside EP split sizes)", None, 0,
                    f"no sync pass in {path.name}", at_most=True)]
    top = sorted(r["locations"].items(), key=lambda kv: -kv[1])[:8]
    detail = (f"MoE layer {r['moe_layer']}, EP split sizes {r['ep_split_sizes']}, backward of C++ autograd nodes "
              f"(module unknown) {r['backward_unattributed']}, elsewhere {r['elsewhere']}; "
              + "; ".join(f"{n} x {where}" for where, n in top))
    return [row("host syncs in the MoE layer per step (outside EP split sizes)", r["moe_layer"], 0, detail,
                at_most=True)]


def markdown(report: dict) -> str:
    """One table per part: target, measured value, threshold, met / not met."""
    lines = [f"# GPU acceptance run, {report['date']}", "",
             f"device: {report['device']}; torch {report['torch']}, triton {report['triton']}, "
             f"CUDA {report['cuda']}; wall {report.get('wall_s', 0):.0f} s of a {report['budget_s']} s budget", ""]
    for name, part in report["parts"].items():
        lines += [f"## {name}", "", f"`{part['command']}`: {part['status']} in {part.get('wall_s', 0):.0f} s "
                  f"(budget {part['budget_s']} s), log `{part['log']}`", "",
                  "| target | measured | threshold | met | detail |", "|---|---|---|---|---|"]
        for t in part.get("targets", []):
            m = "-" if t["measured"] is None else f"{t['measured']:.3g}"
            lines.append(f"| {t['target']} | {m} | {t['threshold']} | {'met' if t['met'] else 'NOT met'} "
                         f"| {t['detail']} |")
        lines.append("")
    return "\n".join(lines)
