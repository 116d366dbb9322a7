#!/usr/bin/env python
"""The ablation study's tables, paired tests and plots, from the per-run result files of run_ablation.py.

Per protocol and variant: mean and sample std over seeds of each metric; against copy+linear (MoE-LLaVA's
upcycling, the baseline): the mean paired difference (same seed = same stages 0-II and data order) with a
paired t-test over seeds, and for POPE accuracy a paired bootstrap over questions (each resampled question
brings the answers of every seed of both variants).

    python examples/ablation/study_report.py runs/ablation     # rewrite study.md / study.json / plots
"""
from __future__ import annotations

import json
import math
import platform
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from megatron_evomoe.eval.seed_statistics import mean_std, paired_bootstrap, paired_t_test  # noqa: E402

BASELINE = "copy+linear"
METRICS = [  # key, column title, format
    ("pope_acc", "POPE acc", ".3f"),
    ("pope_f1", "POPE F1", ".3f"),
    ("heldout_lm_loss", "held-out LM loss", ".4f"),
    ("expert_output_cosine", "expert out-cos", ".3f"),
    ("expert_cka", "expert CKA", ".3f"),
    ("js_image_text", "JS img/txt", ".3f"),
    ("shuffle_f1_drop", "F1 drop, router shuffled", "+.3f"),
    ("shuffle_loss_increase", "loss rise, router shuffled", "+.4f"),
]
DIFF_METRICS = ("pope_acc", "pope_f1", "heldout_lm_loss", "expert_output_cosine", "js_image_text",
                "shuffle_loss_increase")
NUM_RESAMPLES = 10000


def load_rows(out: Path) -> list[dict]:
    """The stage III results; the dense variant (protocol "") is listed under every protocol."""
    rows = [json.loads(p.read_text()) for p in sorted((out / "results").glob("*stage3*.json"))]
    if not rows:
        raise ValueError(f"{out / 'results'}: no stage III results yet")
    return rows


def by_protocol(rows: list[dict], protocol: str) -> dict[str, dict[int, dict]]:
    """variant -> seed -> row, for one protocol (with the protocol-free dense runs)."""
    table: dict[str, dict[int, dict]] = {}
    for r in rows:
        if r["protocol"] in (protocol, ""):
            table.setdefault(r["variant"], {})[r["seed"]] = r
    return table


def summarize(rows: list[dict], protocol: str, variants: list[str]) -> dict:
    """{"variants": {variant: {metric: MeanStd as a dict or None}}, "diffs": {variant: {metric: test}}}.

    A metric a variant does not have (the dense model's expert metrics) is None; paired tests use the
    seeds both the variant and the baseline have."""
    table = by_protocol(rows, protocol)
    summary, diffs = {}, {}
    base = table.get(BASELINE, {})
    for v in variants:
        runs = table.get(v, {})
        summary[v] = {"num_seeds": len(runs)}
        for key, _, _ in METRICS:
            values = [r[key] for r in runs.values() if r.get(key) is not None]
            summary[v][key] = mean_std(values)._asdict() if values else None
        if v == BASELINE or not base:
            continue
        seeds = sorted(set(runs) & set(base))
        diffs[v] = {}
        for key in DIFF_METRICS:
            pairs = [(runs[s][key], base[s][key]) for s in seeds
                     if runs[s].get(key) is not None and base[s].get(key) is not None]
            diffs[v][key] = paired_t_test(*zip(*pairs))._asdict() if len(pairs) >= 2 else None
        if len(seeds) >= 1:
            diffs[v]["pope_acc_bootstrap"] = paired_bootstrap(
                [runs[s]["pope_correct"] for s in seeds], [base[s]["pope_correct"] for s in seeds],
                num_resamples=NUM_RESAMPLES, seed=0)._asdict()
    return {"variants": summary, "diffs": diffs}


def _cell(stat: dict | None, spec: str) -> str:
    if stat is None:
        return "-"
    if math.isnan(stat["std"]):
        return format(stat["mean"], spec)
    return f"{format(stat['mean'], spec)} ± {format(stat['std'], spec.lstrip('+'))}"


def _p(p: float) -> str:
    if math.isnan(p):
        return "p -"
    return ("p<0.001" if p < 0.001 else f"p={p:.3f}") + (" *" if p < 0.05 else "")


def _diff_cell(test: dict | None, spec: str) -> str:
    return "-" if test is None else f"{format(test['mean_difference'], spec)} ({_p(test['p_value'])})"


def tables(summary: dict, variants: list[str]) -> str:
    lines = ["| variant | seeds | " + " | ".join(title for _, title, _ in METRICS) + " |",
             "|" + "---|" * (len(METRICS) + 2)]
    for v in variants:
        s = summary["variants"][v]
        lines.append(f"| {v} | {s['num_seeds']} | " + " | ".join(_cell(s[k], f) for k, _, f in METRICS) + " |")
    spec = {k: f for k, _, f in METRICS}
    titles = {k: t for k, t, _ in METRICS}
    lines += ["", f"Paired differences against {BASELINE} (variant - baseline, same seed; paired t-test over "
              "seeds; bootstrap: over questions, all seeds, 95% interval; * p < 0.05):", "",
              "| variant | POPE acc, bootstrap | " + " | ".join(titles[k] for k in DIFF_METRICS) + " |",
              "|" + "---|" * (len(DIFF_METRICS) + 2)]
    for v, d in summary["diffs"].items():
        b = d["pope_acc_bootstrap"]
        boot = f"{b['difference']:+.3f} [{b['low']:+.3f}, {b['high']:+.3f}] ({_p(b['p_value'])})"
        spec_signed = lambda k: spec[k] if spec[k].startswith("+") else "+" + spec[k]  # noqa: E731
        lines.append(f"| {v} | {boot} | " + " | ".join(_diff_cell(d[k], spec_signed(k)) for k in DIFF_METRICS) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], protocol: str, variants: list[str], path: Path) -> bool:
    """Each metric per variant: the mean over seeds with a +-1 std bar, and every seed's value as a dot."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    table = by_protocol(rows, protocol)
    fig, axes = plt.subplots(2, 4, figsize=(18, 7.5))
    for ax, (key, title, _) in zip(axes.flat, METRICS):
        for x, v in enumerate(variants):
            values = [r[key] for r in table.get(v, {}).values() if r.get(key) is not None]
            if not values:
                continue
            s = mean_std(values)
            ax.bar(x, s.mean, yerr=0.0 if math.isnan(s.std) else s.std, capsize=4, color="#9ab" if v != BASELINE
                   else "#c96", edgecolor="black", linewidth=0.5)
            ax.plot([x] * len(values), values, "k.", markersize=4)
        ax.set_xticks(range(len(variants)), variants, rotation=40, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        values = [r[key] for v in variants for r in table.get(v, {}).values() if r.get(key) is not None]
        if values and key in ("pope_acc", "pope_f1", "heldout_lm_loss"):  # a zoom, not a bar from zero
            lo, hi = min(values), max(values)
            ax.set_ylim(lo - 0.3 * (hi - lo + 1e-6), hi + 0.3 * (hi - lo + 1e-6))
    fig.suptitle(f"EvoMoE ablation, stage III protocol '{protocol}' (mean ± std over seeds, dots: seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def write_report(out: Path, meta: dict) -> str:
    """study.md, study.json and plot_<protocol>.png under `out`; returns the markdown."""
    rows = load_rows(out)
    seconds = sum(json.loads(p.read_text())["train_seconds"] for p in (out / "results").glob("*.json"))
    parts = [f"Ablation study: seeds {meta['seeds']}, steps {meta['steps']}; {platform.machine()}, {date.today()}; "
             f"{seconds / 60:.1f} process-minutes of runs (training + analysis) in all."]
    summaries = {}
    for protocol in meta["protocols"]:
        summaries[protocol] = summarize(rows, protocol, meta["variants"])
        what = "the router only" if protocol == "paper" else "experts + router, top-2, aux 0.01"
        plotted = plot(rows, protocol, meta["variants"], out / f"plot_{protocol}.png")
        parts += ["", f"### Protocol '{protocol}' (stage III trains {what})", "",
                  tables(summaries[protocol], meta["variants"]),
                  "", f"plot: plot_{protocol}.png" if plotted else "plot: skipped (matplotlib is not installed)"]
    md = "\n".join(parts) + "\n"
    (out / "study.md").write_text(md)
    (out / "study.json").write_text(json.dumps({"meta": meta, "summaries": summaries}, indent=1))
    return md


def main(argv=None) -> int:
    out = Path((argv or sys.argv[1:])[0])
    meta = json.loads((out / "study_meta.json").read_text())
    print(write_report(out, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
