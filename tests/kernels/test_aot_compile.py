"""Ahead-of-time compile of every registered kernel for sm_80 and sm_90, without a GPU.

TRITON_INTERPRET=1 (set for the test session) turns @triton.jit functions into interpreter
objects at import, so the compile runs in a subprocess with it unset. The report is produced once
per session and checked here: every kernel compiles at every registered (autotuned) config for both
archs, no config spills to local memory, and the grouped GEMM kernels use HGMMA (wgmma) on sm_90.
"""
import json
import os
import subprocess
import sys

import pytest

ARCHS = (80, 90)
EXPECTED_KERNELS = {
    "grouped_mm_fwd", "grouped_mm_dgrad", "grouped_mm_wgrad",
    "expert_histogram", "permute", "permute_bwd", "unpermute", "unpermute_bwd", "unpermute_bwd_zero_rows",
}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_evomoe.kernels.aot", "--arch", *map(str, ARCHS), "--out", str(out),
         "--jobs", str(min(4, os.cpu_count() or 1))],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"aot failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    data = json.loads(out.read_text())
    data["stdout"] = proc.stdout
    return data


def test_every_registered_kernel_compiles_for_sm80_and_sm90(report):
    assert not report["import_errors"], report["import_errors"]
    rows = report["rows"]
    kernels = {r["kernel"] for r in rows}
    assert EXPECTED_KERNELS <= kernels, f"missing from the registry: {EXPECTED_KERNELS - kernels}"
    failed = [f"{r['kernel']} [{r['config']}] sm_{r['arch']}: {r['error']}" for r in rows if not r["ok"]]
    assert not failed, "\n".join(failed)
    for kernel in kernels:
        configs = {r["config"] for r in rows if r["kernel"] == kernel}
        for arch in ARCHS:
            done = {r["config"] for r in rows if r["kernel"] == kernel and r["arch"] == arch}
            assert done == configs, f"{kernel}: configs not compiled for sm_{arch}: {configs - done}"


def test_no_local_memory_spills(report):
    # Every registered config is one the autotuner may pick, so all of them are hot.
    spills = [f"{r['kernel']} [{r['config']}] sm_{r['arch']}: LOCAL={r['local']}"
              for r in report["rows"] if r["ok"] and r["local"] > 0]
    assert not spills, "\n".join(spills)


def test_grouped_gemm_uses_hgmma_on_sm90(report):
    for kernel in ("grouped_mm_fwd", "grouped_mm_dgrad", "grouped_mm_wgrad"):
        rows = [r for r in report["rows"] if r["kernel"] == kernel and r["arch"] == 90]
        assert rows and all(r["hgmma"] for r in rows), \
            f"{kernel}: no HGMMA in {[r['config'] for r in rows if not r['hgmma']]}"
    # and none on sm_80, where wgmma does not exist (a sanity check of the SASS scan)
    assert not any(r["hgmma"] for r in report["rows"] if r["arch"] == 80)
    assert not report["problems"], report["problems"]


def test_register_aot_rejects_empty_configs():
    from megatron_evomoe.kernels import aot

    with pytest.raises(ValueError, match="constexpr_configs is empty"):
        aot.register_aot(object(), {}, [], name="bogus")
    assert aot.config_label(dict(BLOCK_M=64, BLOCK_N=32, TOPK=2, FLAG=True, MODE="ieee", num_warps=4,
                                 num_stages=3)) == "M64 N32 TOPK=2 w4 s3"
