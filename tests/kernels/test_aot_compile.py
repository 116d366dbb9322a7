"""Ahead-of-time compile of every registered kernel for sm_80 and sm_90, without a GPU.

TRITON_INTERPRET=1 (set for the test session) turns @triton.jit functions into interpreter
objects at import, so the compile runs in a subprocess with it unset. The report is produced once
per module and checked here: every registered kernel compiles for both archs (or the archs it is
registered for: the TMA grouped GEMM is sm_90 only), no compiled config spills to local memory or
exceeds the arch's shared memory, the grouped GEMM kernels use HGMMA (wgmma) on sm_90 and the TMA
variant's loads are UTMALDG.

The kernels of this test's own files (grouped GEMM, permute) are compiled at every config they
autotune over. Kernels other files register are compiled at their first config here, to keep this
test under two minutes on a cold Triton cache, except the DTR's: its first AOT_CI_CONFIGS configs
(kernels/dtr_config.py: the recipe's widest hypernetwork at rank 16 and narrowest at rank 8), in
fp32 and bf16. The full report over all configs (for the DTR: every recipe shape) is
``python -m megatron_evomoe.kernels.aot --check``.
"""
import json
import os
import signal
import subprocess
import sys

import pytest

from megatron_evomoe.kernels import aot
from megatron_evomoe.kernels.dtr_config import AOT_CI_CONFIGS
from megatron_evomoe.kernels.grouped_gemm import FWD_CONFIGS, WGRAD_CONFIGS
from megatron_evomoe.kernels.grouped_gemm_tma import TMA_CONFIGS

ARCHS = (80, 90)
TMA_KERNELS = ("grouped_mm_fwd_tma", "grouped_mm_dgrad_tma", "grouped_mm_wgrad_tma")
OWN_KERNELS = {
    "grouped_mm_fwd", "grouped_mm_dgrad", "grouped_mm_wgrad", *TMA_KERNELS,
    "expert_histogram", "permute", "permute_bwd", "unpermute", "unpermute_bwd", "unpermute_bwd_zero_rows",
}


def _aot(*args, timeout=400):
    """Run the AOT tool without TRITON_INTERPRET, in its own process group (killed on timeout so that
    no compile worker outlives the test)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.Popen([sys.executable, "-m", "megatron_evomoe.kernels.aot", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"aot {' '.join(args)} took more than {timeout} s")
    assert proc.returncode == 0, f"aot {' '.join(args)} failed:\n{out}\n{err[-4000:]}"
    return out


assert not aot.discover()
DTR_KERNELS = sorted(n for n in aot.registered() if n.startswith("dtr_"))


def _report(tmp_path_factory, *args):
    out = tmp_path_factory.mktemp("aot") / "report.json"
    _aot("--arch", *map(str, ARCHS), *args, "--jobs", str(min(4, os.cpu_count() or 1)), "--out", str(out))
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    data = _report(tmp_path_factory, "--max-configs", "1", "--full", *sorted(OWN_KERNELS), "--exclude", *DTR_KERNELS)
    assert OWN_KERNELS <= set(data["registered"]), f"missing from the registry: {OWN_KERNELS - set(data['registered'])}"
    return data


@pytest.fixture(scope="module")
def dtr_report(tmp_path_factory):
    return _report(tmp_path_factory, "--kernel", *DTR_KERNELS, "--max-configs", str(AOT_CI_CONFIGS))


def test_every_registered_kernel_compiles_for_sm80_and_sm90(report):
    assert not report["import_errors"], report["import_errors"]
    rows = report["rows"]
    kernels = {r["kernel"] for r in rows}
    expected = set(report["registered"]) - set(DTR_KERNELS)   # the DTR's: test_dtr_kernels_compile_without_spills
    assert kernels == expected, f"not compiled: {expected - kernels}"
    # this file's kernels at every autotuned config
    assert len({r["config"] for r in rows if r["kernel"] == "grouped_mm_fwd"}) == len(FWD_CONFIGS)
    assert len({r["config"] for r in rows if r["kernel"] == "grouped_mm_wgrad"}) == len(WGRAD_CONFIGS)
    assert len({r["config"] for r in rows if r["kernel"] == "grouped_mm_fwd_tma"}) == len(TMA_CONFIGS)
    failed = [f"{r['kernel']} [{r['config']}] sm_{r['arch']}: {r['error']}" for r in rows if not r["ok"]]
    assert not failed, "\n".join(failed)
    aot.discover()  # this process's registry (interpreted kernels register the same entries)
    for kernel in kernels:
        configs = {r["config"] for r in rows if r["kernel"] == kernel}
        archs = aot.registered()[kernel].archs or ARCHS
        assert {r["arch"] for r in rows if r["kernel"] == kernel} == set(archs), kernel
        for arch in archs:
            done = {r["config"] for r in rows if r["kernel"] == kernel and r["arch"] == arch}
            assert done == configs, f"{kernel}: configs not compiled for sm_{arch}: {configs - done}"


def test_no_local_memory_spills(report):
    # Every registered config is one the autotuner may pick, so all of them are hot.
    # spills show up as LOCAL and/or STACK bytes (Triton kernels have no other stack use)
    spills = [f"{r['kernel']} [{r['config']}] sm_{r['arch']}: LOCAL={r['local']} STACK={r['stack']}"
              for r in report["rows"] if r["ok"] and (r["local"] > 0 or r["stack"] > 0)]
    assert not spills, "\n".join(spills)


def test_grouped_gemm_uses_hgmma_on_sm90(report):
    for kernel in ("grouped_mm_fwd", "grouped_mm_dgrad", "grouped_mm_wgrad", *TMA_KERNELS):
        rows = [r for r in report["rows"] if r["kernel"] == kernel and r["arch"] == 90]
        assert rows and all(r["hgmma"] for r in rows), \
            f"{kernel}: no HGMMA in {[r['config'] for r in rows if not r['hgmma']]}"
    # and none on sm_80, where wgmma does not exist (a sanity check of the SASS scan)
    assert not any(r["hgmma"] for r in report["rows"] if r["arch"] == 80)
    assert not report["problems"], report["problems"]


def test_tma_variant_loads_with_utmaldg_on_sm90(report):
    tma = [r for r in report["rows"] if r["kernel"] in TMA_KERNELS]
    assert len(tma) == len(TMA_KERNELS) * len(TMA_CONFIGS) and all(r["arch"] == 90 and r["tma_expected"] for r in tma)
    assert all(r["tma"] for r in tma), [f"{r['kernel']} [{r['config']}]" for r in tma if not r["tma"]]
    # the cp.async kernels have no TMA load (a sanity check of the SASS scan)
    assert not any(r["tma"] for r in report["rows"] if r["kernel"] in ("grouped_mm_fwd", "grouped_mm_wgrad"))


def test_check_fails_on_missing_utmaldg_and_shared_memory_over_the_limit():
    row = dict(kernel="k", config="M128", arch=90, ok=True, local=0, stack=0, hgmma_expected=True, hgmma=True,
               tma_expected=True, tma=False, shared=aot.MAX_SHARED_BYTES[90] + 16, registers=128)
    found = aot.problems([row], [])
    assert len(found) == 2 and "no UTMALDG" in found[0] and f"{row['shared']} bytes of shared memory" in found[1]
    assert aot.problems([dict(row, tma=True, shared=aot.MAX_SHARED_BYTES[90])], []) == []
    assert "MISSING" in aot.format_table([row]).splitlines()[-1]


def test_dtr_kernels_compile_without_spills(dtr_report):
    """The DTR (10 kernels: fwd and 4 backward, fp32 and bf16) at the recipe's widest (H = 256, R = 16)
    and narrowest (H = 16, R = 8) hypernetworks: compiled for both archs, no local memory, no stack."""
    assert len(DTR_KERNELS) == 10 and not dtr_report["problems"], dtr_report["problems"]
    rows = dtr_report["rows"]
    for name in DTR_KERNELS:
        configs = aot.registered()[name].configs[:AOT_CI_CONFIGS]
        assert {(c["H"], c["R"]) for c in configs} == {(256, 16), (16, 8)}, name
        for arch in ARCHS:
            done = [r for r in rows if r["kernel"] == name and r["arch"] == arch]
            assert len(done) == len(configs) and all(r["ok"] for r in done), f"{name} sm_{arch}: {done}"
            assert all(r["local"] == 0 and r["stack"] == 0 and r["registers"] <= 255 for r in done), \
                f"{name} sm_{arch} spills: {[(r['config'], r['stack'], r['local']) for r in done]}"


def test_register_aot_rejects_empty_configs():
    from megatron_evomoe.kernels import aot

    with pytest.raises(ValueError, match="constexpr_configs is empty"):
        aot.register_aot(object(), {}, [], name="bogus")
    assert aot.config_label(dict(BLOCK_M=64, BLOCK_N=32, TOPK=2, FLAG=True, MODE="ieee", num_warps=4,
                                 num_stages=3)) == "M64 N32 TOPK=2 w4 s3"
