#!/usr/bin/env python
"""The long version of the kill/resume tests: SIGKILL the demo training at random moments, resume
it, and compare with an uninterrupted run of the same layout (bit for bit: every logged step's
loss and grad norm, the stage-end POPE scores, every rank's final parameters).

    python tests/reliability/fault_campaign.py --trials 30 --seed 1            # 1 and 2 processes (DP=2)
    python tests/reliability/fault_campaign.py --trials 10 --seed 2 --nproc 2  # DP=2 under torchrun only
    python tests/reliability/fault_campaign.py --trials 12 --nproc 2 --layout all   # DP, TP, PP or EP =2

Each trial draws a moment (mode: step / save / evolve / stage, and which occurrence N), and for
2 processes the rank that dies and how the job comes back: `relaunch` (torchrun exits, the same
command is run again) or `elastic` (torchrun --max-restarts=1 restarts the workers itself), and
with `--layout all` the layout (dp2, tp2, pp2 or ep2; otherwise every 2-process trial runs in the
one --layout names).
Prints one table row per trial and a summary; exits 1 if any trial failed. The results of a run
are recorded in tests/reliability/RESULTS.md.
"""
from __future__ import annotations

import argparse
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.reliability import harness  # noqa: E402

# How many times each hook fires in the tiny recipe (11 steps; save_interval=2 -> 7 checkpoints;
# 3 evolution updates; 4 stage-end checkpoints): N is drawn from these ranges.
OCCURRENCES = {"step": 11, "save": 7, "evolve": 3, "stage": 4}


def draw(rng: random.Random, nproc: int, layout: str) -> dict:
    """One trial; `layout`: the 2-process layout, or 'all' to draw one (drawn last, so that a seed
    draws the same moments, ranks and restarts with any fixed layout)."""
    mode = rng.choice(sorted(OCCURRENCES))
    trial = {"layout": "single", "mode": mode, "n": rng.randint(1, OCCURRENCES[mode]), "rank": 0,
             "restart": "relaunch"}
    if nproc == 2:
        trial["rank"] = rng.randint(0, 1)
        trial["restart"] = rng.choice(["relaunch", "elastic"])
        trial["layout"] = rng.choice(harness.PARALLEL_LAYOUTS) if layout == "all" else layout
        if trial["layout"] == "pp2" and mode == "evolve":
            trial["rank"] = 1  # the MoE layer (layer 1 of 2) is on the last pipeline stage: rank 0 never evolves
    return trial


def run_trial(trial: dict, reference: Path, data_root: Path, work: Path) -> dict:
    save, marker = work / "run", work / "fired"
    fault = (trial["mode"], str(trial["n"]))
    layout = trial["layout"]
    env = harness.fault_env("kill", rank=trial["rank"] if layout != "single" else None, once=marker)
    t0 = time.perf_counter()
    elastic = trial["restart"] == "elastic"
    first = harness.run(harness.command(save, data_root, layout, fault, max_restarts=1 if elastic else 0), env)
    (work / "first.log").write_text(first.stderr)
    out = {"fired": marker.exists(), "first_rc": first.returncode, "problems": []}
    if not out["fired"]:
        out["problems"].append(f"the fault did not fire (rc {first.returncode}): {errors_in(first.stderr)}")
    if elastic:
        resumed = first
    else:
        if first.returncode == 0:
            out["problems"].append("the killed run exited 0")
        out["problems"] += harness.check_latest_loadable(save)  # nothing half-written is latest
        resumed = harness.run(harness.command(save, data_root, layout))
        (work / "resumed.log").write_text(resumed.stderr)
    if resumed.returncode != 0:
        out["problems"].append(f"the resumed run failed (rc {resumed.returncode}): {errors_in(resumed.stderr)}")
    m = re.search(r"resuming from \S+/(\S+) \(", resumed.stderr)
    out["resumed_from"] = m.group(1) if m else "start"
    if resumed.returncode == 0:
        out["problems"] += harness.compare(reference, save)
    out["seconds"] = time.perf_counter() - t0
    return out


def errors_in(stderr: str) -> str:
    """The lines that say what went wrong (not torchrun's summary block)."""
    lines = [ln for ln in stderr.splitlines() if re.search(r"Error|error:|Traceback", ln) and "error_file" not in ln]
    return " | ".join(lines[-4:])[-600:] or stderr[-300:]


def reference_run(layout: str, data_root: Path, work: Path) -> Path:
    save = work / f"reference_{layout}"
    r = harness.run(harness.command(save, data_root, layout))
    if r.returncode != 0:
        raise SystemExit(f"the uninterrupted {layout} run failed:\n{r.stderr[-3000:]}")
    return save


HEADER = ("| #  | layout | mode   |  N | rank | restart  | first rc  | resumed from            | result | s    |\n"
          "|----|--------|--------|----|------|----------|-----------|-------------------------|--------|------|")


def row(i: int, trial: dict, res: dict) -> str:
    rank = str(trial["rank"]) if trial["layout"] != "single" else "-"
    return (f"| {i + 1:>2} | {trial['layout']:<6} | {trial['mode']:<6} | {trial['n']:>2} | {rank:>4} | "
            f"{trial['restart']:<8} | {res['first_rc']:>9} | {res['resumed_from']:<23} | "
            f"{'PASS' if not res['problems'] else 'FAIL':<6} | {res['seconds']:>4.0f} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nproc", choices=["1", "2", "both"], default="both",
                        help="1 process, 2 processes (gloo, torchrun), or both alternately (default)")
    parser.add_argument("--layout", choices=[*harness.PARALLEL_LAYOUTS, "all"], default="dp2",
                        help="the 2-process layout (default dp2); all: drawn per trial")
    parser.add_argument("--workdir", help="keep runs here (default: a temporary folder, removed at the end)")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="fault_campaign_"))
    work.mkdir(parents=True, exist_ok=True)
    from megatron_evomoe.data.build_bundled import build_bundled_dataset
    data_root = work / "data"
    if not (data_root / "captions.json").exists():
        build_bundled_dataset(str(data_root), num_images=48, num_test_images=8, image_size=16, seed=42)
    nprocs = [1, 2] if args.nproc == "both" else [int(args.nproc)]
    refs = {}  # layout -> its uninterrupted run, made when a trial first needs it
    print(HEADER)
    failures = 0
    for i in range(args.trials):
        trial = draw(rng, nprocs[i % len(nprocs)], args.layout)
        if trial["layout"] not in refs:
            refs[trial["layout"]] = reference_run(trial["layout"], data_root, work)
        trial_dir = work / f"trial{i:03d}"
        shutil.rmtree(trial_dir, ignore_errors=True)
        trial_dir.mkdir()
        res = run_trial(trial, refs[trial["layout"]], data_root, trial_dir)
        failures += bool(res["problems"])
        print(row(i, trial, res), flush=True)
        for p in res["problems"]:
            print(f"|    | {p}", flush=True)
        if not res["problems"] and not args.workdir:
            shutil.rmtree(trial_dir, ignore_errors=True)
    print(f"\n{args.trials - failures}/{args.trials} trials identical to the uninterrupted run "
          f"(seed {args.seed}, processes {nprocs}, 2-process layout {args.layout})")
    if failures:
        print(f"the failed trials' runs and logs are kept in {work}")
    elif not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
