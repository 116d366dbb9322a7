#!/usr/bin/env python
"""The GPU acceptance run of issue 15: one command, <= 8 minutes on one H100 / H200, one JSON + markdown.

    bash benchmarks/gpu_acceptance.sh                        # on a GPU: every part, in $OUT_DIR
    bash benchmarks/gpu_acceptance.sh --dry-run              # on CPU (CI): the plan + a cheap check of each part
    python benchmarks/gpu_acceptance.py --parts dtr,train_step --out-dir DIR    # a subset

Parts, each its own process with a time budget (killed past it; the next part still runs):
  tests         TRITON_INTERPRET=0 pytest -m gpu tests (compiled kernels), junit XML -> pass/fail counts
  grouped_gemm  bench_grouped_gemm.py at the recipe's expert shapes: vs dense cuBLAS of equal FLOPs and
                torch._grouped_mm
  dtr           bench_router.py at 16k tokens: the fused DTR vs eager PyTorch
  permute       bench_permute.py at the recipe's shapes: vs a device-to-device copy of the same bytes
  train_step    gpu_train_step.py --sync-debug: bf16 training step of examples/configs/gpu_1b_moe.yaml (1.08B
                active parameters, 2 x 2048 tokens): tokens/s, TFLOP/s (stages/flops.py), MFU; then one
                step under torch.cuda.set_sync_debug_mode("warn"): host syncs, MoE layer vs elsewhere
A part past its budget gets SIGINT (pytest then writes the junit XML of the tests run so far), SIGKILL
10 s later. The targets (acceptance_targets.py) are benchmarks, not tests: a target not met does not fail the run;
a part that fails or times out does (exit status 1), after every other part has run.
$OUT_DIR/gpu_acceptance.json and .md are rewritten after each part.

--dry-run (no GPU needed) prints the plan and checks each part cheaply: the scripts exist and their
CPU smoke path (--tiny) runs and writes the JSON the targets read, pytest collects > 0 `gpu` tests,
the 1B config loads and validates, its FLOPs and parameter counts are printed, and the training step
runs on CPU at a tiny size. Exit status 1 names every missing piece.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import acceptance_targets as targets  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples/configs/gpu_1b_moe.yaml"
# the CPU smoke of the training step: the config's code path at a size that runs in seconds
TINY_TRAIN = ["--device", "cpu", "--steps", "1", "--warmup", "0", "--model.hidden_size=64", "--model.num_layers=2",
              "--model.num_heads=4", "--model.num_kv_heads=2", "--model.ffn_hidden_size=128",
              "--model.vocab_size=256", "--model.max_seq_len=64", "--data.seq_len=64", "--train.bf16=false"]


@dataclass
class Part:
    name: str
    budget_s: int
    script: str  # file under --bench-dir ("" for pytest)
    args: list  # GPU run: arguments after the script; {out} is the output folder
    output: str  # file under the output folder the targets read
    score: object  # acceptance_targets function: Path -> list of target rows
    smoke: list = field(default_factory=list)  # dry run: arguments for a CPU smoke run; {tmp}: a temp folder


PARTS = [
    Part("tests", 110, "", ["-m", "pytest", "-m", "gpu", "tests", "-q", "--junitxml={out}/pytest_gpu.xml"],
         "pytest_gpu.xml", targets.pytest_targets),
    Part("grouped_gemm", 60, "bench_grouped_gemm.py", ["--only", targets.RECIPE_GEMM, "--json", "{out}/grouped_gemm.json"],
         "grouped_gemm.json", targets.grouped_gemm_targets,
         ["--tiny", "--only", "tiny-8e", "--warmup", "0", "--iters", "1", "--json", "{tmp}/grouped_gemm.json"]),
    Part("dtr", 40, "bench_router.py", ["--only", targets.RECIPE_DTR, "--json", "{out}/dtr.json"],
         "dtr.json", targets.dtr_targets,
         ["--tiny", "--only", "tiny", "--warmup", "0", "--iters", "1", "--json", "{tmp}/dtr.json"]),
    Part("permute", 40, "bench_permute.py", ["--only", targets.RECIPE_GEMM, "--json", "{out}/permute.json"],
         "permute.json", targets.permute_targets,
         ["--tiny", "--only", "tiny-8e", "--warmup", "0", "--iters", "1", "--json", "{tmp}/permute.json"]),
    # one process for the step and the sync pass: the 1.5B model is built and autotuned once
    Part("train_step", 180, "gpu_train_step.py",
         ["--config", "{config}", "--sync-debug", "--json", "{out}/train_step.json"],
         "train_step.json", targets.train_targets,
         ["--config", "{config}", "--json", "{tmp}/train_step.json", *TINY_TRAIN]),
]


def command(part: Part, args, argv: list, **fmt) -> list[str]:
    script = [] if not part.script else [str(Path(args.bench_dir) / part.script)]
    return [sys.executable, *script, *(a.format(config=args.config, **fmt) for a in argv)]


def run_part(cmd: list[str], env: dict, budget_s: int, log: Path) -> tuple[str, float]:
    """Run `cmd` in its own process group, killed after `budget_s`; -> (status, seconds)."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=budget_s)
        except subprocess.TimeoutExpired:
            stop(proc)
            return f"timed out after {budget_s} s", time.perf_counter() - t0
    return ("ok" if rc == 0 else f"failed (exit {rc})"), time.perf_counter() - t0


def stop(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGINT to the part's process group first: pytest then writes the junit XML of the tests run so
    far; SIGKILL to the whole group (pytest workers, compile children) after `grace_s`."""
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    try:  # also the children a part's main process left behind
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def environment() -> dict:
    import torch
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    on_gpu = torch.cuda.is_available()
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": torch.cuda.get_device_name(0) if on_gpu else "no CUDA device", "torch": torch.__version__,
            "triton": triton_version, "cuda": torch.version.cuda}


def run_all(args, parts: list[Part]) -> int:
    import torch
    if not torch.cuda.is_available():
        print("no CUDA device visible: on CPU run --dry-run", file=sys.stderr)
        return 2
    missing = missing_scripts(args, parts)
    if missing:  # before any GPU time is spent
        print("\n".join(missing), file=sys.stderr)
        return 2
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "TRITON_INTERPRET": "0"}
    report = {**environment(), "budget_s": sum(p.budget_s for p in parts), "parts": {}}
    t0, failed = time.perf_counter(), False
    for part in parts:
        cmd = command(part, args, part.args, out=out)
        entry = report["parts"][part.name] = {"command": shlex.join(cmd), "budget_s": part.budget_s,
                                              "log": str(out / f"{part.name}.log"), "status": "running"}
        save(report, out)
        print(f"== {part.name} (budget {part.budget_s} s): {entry['command']}", flush=True)
        (out / part.output).unlink(missing_ok=True)  # a previous run's output must not be scored as this one's
        entry["status"], entry["wall_s"] = run_part(cmd, env, part.budget_s, out / f"{part.name}.log")
        entry["targets"] = score(part, out / part.output)  # also after a failure: partial output counts
        failed |= entry["status"] != "ok"
        report["wall_s"] = time.perf_counter() - t0
        save(report, out)
        for t in entry["targets"]:
            print(f"   {entry['status']}: {t['target']}: {t['measured']} ({t['threshold']}, "
                  f"{'met' if t['met'] else 'NOT met'})", flush=True)
    print(f"wrote {out / 'gpu_acceptance.json'} and {out / 'gpu_acceptance.md'}")
    return 1 if failed else 0


def score(part: Part, path: Path) -> list[dict]:
    """The part's target rows; a scorer that cannot read the output gives one row saying why."""
    try:
        return part.score(path)
    except Exception as exc:  # e.g. a JSON cut short: the run goes on to the next part
        return [targets.row(f"{part.name}: output readable", None, 1, f"{path.name}: {type(exc).__name__}: {exc}")]


def save(report: dict, out: Path) -> None:
    (out / "gpu_acceptance.json").write_text(json.dumps(report, indent=1))
    (out / "gpu_acceptance.md").write_text(targets.markdown(report))


def missing_scripts(args, parts: list[Part]) -> list[str]:
    missing = [f"{p.name}: missing script {Path(args.bench_dir) / p.script}" for p in parts
               if p.script and not (Path(args.bench_dir) / p.script).is_file()]
    if any(p.name == "train_step" for p in parts) and not Path(args.config).is_file():
        missing.append(f"train_step: missing config {args.config}")
    return missing


def print_plan(args, parts: list[Part]) -> None:
    print(f"GPU acceptance plan: {len(parts)} parts, {sum(p.budget_s for p in parts)} s budget in all, "
          f"output {args.out_dir}/gpu_acceptance.{{json,md}}")
    for part in parts:
        cmd = command(part, args, part.args, out=args.out_dir)
        print(f"  part {part.name:<13} budget {part.budget_s:>4} s  {shlex.join(cmd)}")


def dry_run(args, parts: list[Part]) -> int:
    """The plan, then each part's cheap check, every one even after a failure; 1 if any failed.
    pytest's collection runs in the background while the scripts' CPU smokes run in this process
    (one torch import instead of one per script: the dry run is part of CI)."""
    print_plan(args, parts)
    problems = missing_scripts(args, parts)
    names = {p.name for p in parts}
    collect = None
    if "tests" in names:
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        collect = subprocess.Popen([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu",
                                    *gpu_test_files()], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
    if "train_step" in names and Path(args.config).is_file():
        problems += check_config(args.config)
        import torch
        if not hasattr(torch.cuda, "set_sync_debug_mode"):
            problems.append("train_step: this torch has no torch.cuda.set_sync_debug_mode (the host-sync pass)")
    with tempfile.TemporaryDirectory() as tmp:
        for part in parts:
            if part.smoke and (Path(args.bench_dir) / part.script).is_file():
                problems += smoke(part, args, Path(tmp))
    if collect is not None:
        problems += judge_collection(collect)
    for p in problems:
        print(f"MISSING {p}")
    print("dry run: " + ("every part is ready" if not problems else f"{len(problems)} problem(s)"))
    return 1 if problems else 0


def smoke(part: Part, args, tmp: Path) -> list[str]:
    """Run the part's script's main() with its CPU smoke arguments; its output must carry what the
    part's targets read (a renamed column would leave the GPU run unscored)."""
    path = Path(args.bench_dir) / part.script
    argv = [a.format(config=args.config, tmp=tmp) for a in part.smoke]
    shown = f"{path.name} {' '.join(argv)}"
    log = io.StringIO()
    try:
        spec = importlib.util.spec_from_file_location(f"acceptance_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        with contextlib.redirect_stdout(log):
            spec.loader.exec_module(module)
            rc = module.main(argv)
    except SystemExit as exc:
        rc = exc.code
    except Exception as exc:  # any failure of the smoke is this part's problem, reported with the others
        rc = f"{type(exc).__name__}: {exc}"
    if rc not in (0, None):
        return [f"{part.name}: `{shown}` failed: {rc}"]
    why = targets.unreadable(tmp / part.output)
    if why:
        return [f"{part.name}: {why}"]
    rows = part.score(tmp / part.output)  # (no GPU rows in a CPU smoke: nothing measured)
    print(f"  check {part.name}: CPU smoke ran, its {part.output} has what the {len(rows)} target(s) read")
    return []


def judge_collection(proc: subprocess.Popen) -> list[str]:
    try:
        text, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        proc.kill()
        return ["tests: pytest's collection did not finish in 240 s"]
    m = re.search(r"(\d+)(?:/\d+)? tests? collected", text)
    n = int(m.group(1)) if m else 0
    if proc.returncode != 0 or n == 0:
        tail = text.strip().splitlines()[-1] if text.strip() else ""
        return [f"tests: pytest collects no `gpu` tests (exit {proc.returncode}): {tail}"]
    print(f"  check tests: pytest collects {n} gpu tests")
    return []


def gpu_test_files() -> list[str]:
    """Test files that use the gpu marker: collecting only those keeps the dry run fast."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
                  if "mark.gpu" in p.read_text())


def check_config(path: str) -> list[str]:
    """The 1B config loads and validates; print its size and FLOPs per step."""
    sys.path.insert(0, str(ROOT))
    from megatron_evomoe.config import ConfigError, load_config
    from megatron_evomoe.stages.flops import step_flops
    from megatron_evomoe.stages.size import count_parameters
    try:
        cfg = load_config(path, [])
    except ConfigError as exc:
        return [f"train_step: {path}: {exc}"]
    size = count_parameters(cfg)[-1]
    seq, mb = cfg.data.seq_len, cfg.train.micro_batch_size
    flops = step_flops(cfg, mb * seq, seq, moe_mode=cfg.stages[-1].moe_mode)
    print(f"  check train_step: {Path(path).name}: {size['total'] / 1e9:.2f}B parameters, "
          f"{size['llm_active_per_token'] / 1e9:.2f}B active per token; {flops.total / 1e12:.1f} TFLOP per step "
          f"({mb} x {seq} tokens, 3 x forward)")
    return []


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="print the plan and check every part on CPU")
    p.add_argument("--out-dir", default=os.environ.get("OUT_DIR", str(ROOT / "runs/gpu_acceptance")))
    p.add_argument("--parts", default="", help=f"comma list of parts (default all: {','.join(x.name for x in PARTS)})")
    p.add_argument("--config", default=str(CONFIG), help="config of the training step")
    p.add_argument("--bench-dir", default=str(ROOT / "benchmarks"), help="folder of the part scripts")
    args = p.parse_args(argv)
    wanted = [n.strip() for n in args.parts.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in {x.name for x in PARTS}]
    if unknown:
        p.error(f"--parts: unknown part {unknown[0]!r}")
    parts = [x for x in PARTS if not wanted or x.name in wanted]
    return dry_run(args, parts) if args.dry_run else run_all(args, parts)


if __name__ == "__main__":
    sys.exit(main())
