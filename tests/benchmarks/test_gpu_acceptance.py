"""benchmarks/gpu_acceptance.py: the CPU dry run (plan + a cheap check of every part), a missing piece
failing it, the time-boxed runner that goes on past a failed part, the targets computed from each
part's output, and the host-sync attribution of gpu_train_step.py."""
import argparse
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import acceptance_targets as targets  # noqa: E402
import gpu_acceptance  # noqa: E402
import gpu_train_step  # noqa: E402

SCRIPT = str(ROOT / "benchmarks" / "gpu_acceptance.py")


def run(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_dry_run_lists_every_part_and_passes(tmp_path):
    r = run("--dry-run", "--out-dir", str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    planned = re.findall(r"^  part (\w+) +budget +(\d+) s", r.stdout, re.M)
    assert [name for name, _ in planned] == [p.name for p in gpu_acceptance.PARTS] == [
        "tests", "grouped_gemm", "dtr", "permute", "train_step"]
    # 8 minutes on one H100, with the 10 s grace of each part that runs past its budget
    assert sum(int(b) + 10 for _, b in planned) <= 480
    assert int(re.search(r"pytest collects (\d+) gpu tests", r.stdout).group(1)) > 0
    assert "--sync-debug" in dict(re.findall(r"^  part (\w+) +budget +\d+ s  (.*)$", r.stdout, re.M))["train_step"]
    assert "gpu_1b_moe.yaml: 1.56B parameters, 1.08B active per token; 27.8 TFLOP per step" in r.stdout
    for name in ("grouped_gemm", "dtr", "permute", "train_step"):
        assert f"check {name}: CPU smoke ran" in r.stdout
    assert "dry run: every part is ready" in r.stdout


def test_missing_script_or_config_fails_the_dry_run(tmp_path):
    r = run("--dry-run", "--parts", "grouped_gemm,train_step", "--bench-dir", str(tmp_path),
            "--config", str(tmp_path / "renamed.yaml"))
    assert r.returncode == 1
    assert f"MISSING grouped_gemm: missing script {tmp_path / 'bench_grouped_gemm.py'}" in r.stdout
    assert f"MISSING train_step: missing script {tmp_path / 'gpu_train_step.py'}" in r.stdout
    assert f"MISSING train_step: missing config {tmp_path / 'renamed.yaml'}" in r.stdout
    assert "2 problem(s)" not in r.stdout and "3 problem(s)" in r.stdout


def test_runner_time_boxes_each_part_and_goes_on(tmp_path, monkeypatch):
    """Three fake parts: one fails, one runs past its budget, one writes its output; every one is
    reported, the report is on disk, and the run's status is 1."""
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "fail.py").write_text("import sys; sys.exit(3)")
    (bench / "hang.py").write_text("import time; time.sleep(60)")
    (bench / "write.py").write_text("import json, sys; open(sys.argv[1], 'w').write(json.dumps("
                                    "{'syncs_per_step': {'moe_layer': 0, 'ep_split_sizes': 0, 'elsewhere': 2,"
                                    " 'backward_unattributed': 1,"
                                    " 'locations': {'elsewhere: x.py:1 (f)': 2}}}))")
    parts = [gpu_acceptance.Part("a", 30, "fail.py", [], "none.json", targets.train_targets),
             gpu_acceptance.Part("b", 1, "hang.py", [], "none.json", targets.dtr_targets),
             gpu_acceptance.Part("c", 30, "write.py", ["{out}/s.json"], "s.json", targets.sync_targets)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA H100 80GB HBM3")
    out = tmp_path / "out"
    out.mkdir()
    (out / "none.json").write_text(json.dumps({"syncs_per_step": {"moe_layer": 5}}))  # a previous run's output
    args = argparse.Namespace(out_dir=str(out), config=str(gpu_acceptance.CONFIG), bench_dir=str(bench))
    assert gpu_acceptance.run_all(args, parts) == 1
    report = json.loads((out / "gpu_acceptance.json").read_text())
    status = {n: p["status"] for n, p in report["parts"].items()}
    assert status == {"a": "failed (exit 3)", "b": "timed out after 1 s", "c": "ok"}
    assert report["parts"]["b"]["wall_s"] < 20
    assert [t["measured"] for t in report["parts"]["a"]["targets"]] == [None, None]  # not the stale file's 5
    assert report["parts"]["c"]["targets"][0]["measured"] == 0 and report["parts"]["c"]["targets"][0]["met"]
    md = (out / "gpu_acceptance.md").read_text()
    assert "device: NVIDIA H100 80GB HBM3" in md and "## b" in md
    assert "| fused DTR / eager, forward + backward, 16k tokens | - | >= 3 | NOT met |" in md


def _bench_json(path, title, rows):
    path.write_text(json.dumps({"tables": {title: rows}}))
    return path


def test_grouped_gemm_targets_are_the_worst_ratios(tmp_path):
    rows = []
    for proj, ours, dense, torch_gmm in (("up", 600.0, 700.0, 500.0), ("down", 630.0, 700.0, 700.0)):
        for method, tf in (("triton (ours)", ours), ("dense GEMM (same FLOPs)", dense), ("torch._grouped_mm", torch_gmm)):
            rows.append({"model": "EvoMoE-2B", "load": "balanced", "proj": proj, "pass": "fwd", "method": method,
                         "TFLOP/s": tf})
    rows.append({"model": "EvoMoE-2B", "load": "skewed", "proj": "up", "pass": "fwd", "method": "triton (ours)",
                 "TFLOP/s": 1.0})  # skewed loads carry no target
    vs_dense, vs_torch = targets.grouped_gemm_targets(_bench_json(tmp_path / "g.json", "grouped_gemm", rows))
    assert vs_dense["measured"] == pytest.approx(600 / 700) and vs_dense["met"]  # 0.857 >= 0.85
    assert vs_torch["measured"] == pytest.approx(630 / 700) and not vs_torch["met"]  # down: 0.9 < 1.0


def test_dtr_and_permute_targets(tmp_path):
    dtr = [{"shape": "paper (EvoMoE DTR)", "method": m, "fwd ms": f, "fwd+bwd ms": b}
           for m, f, b in (("fused", 0.2, 0.9), ("eager", 1.0, 2.4))]
    (t,) = targets.dtr_targets(_bench_json(tmp_path / "d.json", "dtr", dtr))
    assert t["measured"] == pytest.approx(2.4 / 0.9) and not t["met"] and "fwd speed-up 5.00x" in t["detail"]
    perm = [{"model": "EvoMoE-2B", "pass": p, "method": m, "GB/s": g}
            for p, vals in (("permute fwd", (("triton", 2400.0), ("cuda_ext", 2600.0), ("torch", 900.0),
                                             ("device copy (same bytes)", 3200.0))),
                            ("unpermute bwd", (("triton", 2300.0), ("device copy (same bytes)", 3000.0))))
            for m, g in vals]
    (t,) = targets.permute_targets(_bench_json(tmp_path / "p.json", "permute", perm))
    assert t["measured"] == pytest.approx(2300 / 3000) and t["met"]  # worst pass 0.767; fwd's best is cuda_ext 0.81


def test_pytest_target_from_junit(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite tests="10" failures="1" errors="0" skipped="1"></testsuite></testsuites>')
    (t,) = targets.pytest_targets(xml)
    assert t["measured"] == pytest.approx(0.8) and not t["met"]
    assert t["detail"] == "8 passed, 1 failed, 0 errors, 1 skipped"


def test_sync_counter_attributes_moe_layer_and_elsewhere():
    from megatron_evomoe.moe.experts import GroupedExperts
    from megatron_evomoe.moe.moe_layer import MoELayer
    from megatron_evomoe.moe.router import TopKRouter

    torch.manual_seed(0)
    moe = MoELayer(TopKRouter(8, 4, 2, backend="torch"), GroupedExperts(4, 8, 16, backend="torch"))
    model = torch.nn.ModuleList([torch.nn.Linear(8, 8), moe])

    def sync_warning(*_):
        warnings.warn(gpu_train_step.SYNC_MESSAGE)

    model[0].register_forward_hook(sync_warning)  # 1 outside the MoE layer
    moe.experts.register_forward_hook(sync_warning)  # 1 inside it
    moe.router.register_forward_hook(sync_warning)  # and 1 more
    x = torch.randn(5, 8)
    with gpu_train_step.SyncCounter(model) as counter:
        y, _ = moe(model[0](x), torch.zeros(5, dtype=torch.long))
        warnings.warn("an unrelated warning")  # not a sync: not counted
        total = y.sum()
        total.register_hook(lambda g: sync_warning())  # a sync in the backward, outside any module
        total.backward()
    s = counter.summary()
    assert (s["moe_layer"], s["ep_split_sizes"], s["backward_unattributed"], s["elsewhere"]) == (2, 0, 1, 1)
    assert sum(s["locations"].values()) == 4


def test_renamed_column_makes_the_output_unreadable(tmp_path):
    good = {"model": "m", "pass": "permute fwd", "method": "triton", "GB/s": 1.0}
    path = _bench_json(tmp_path / "permute.json", "permute", [good])
    assert targets.unreadable(path) == ""
    renamed = {("GBps" if k == "GB/s" else k): v for k, v in good.items()}
    assert targets.unreadable(_bench_json(path, "permute", [renamed])) == "permute.json lacks GB/s"
    assert targets.unreadable(tmp_path / "dtr.json") == "no dtr.json written"
