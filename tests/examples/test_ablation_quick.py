"""The ablation study: its --quick mode end to end (CI runs it; the full study is recorded in
examples/ablation/RESULTS.md), and its statistics on hand-made results."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples/ablation"))

import study_report  # noqa: E402

VARIANTS = ["dense", "copy+linear", "copy+dtr", "evolution+linear", "evolution+dtr", "drop+linear", "noise+linear"]
EXPERT_METRICS = {"expert_output_cosine", "expert_cka", "js_image_text", "shuffle_f1_drop", "shuffle_loss_increase"}


def _study(out, data_root):
    return subprocess.run([sys.executable, str(ROOT / "examples/ablation/run_ablation.py"), "--quick", "--out", str(out),
                           "--jobs", "2", f"--data-root={data_root}"], capture_output=True, text=True, timeout=1200, cwd=ROOT)


def test_quick_study_fills_every_table_and_restarts_without_redoing_runs(tmp_path, data_root):
    out = tmp_path / "study"
    r = _study(out, data_root)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count(" done seed") == 1 + 2 * 2 + 2 * (1 + 6 * 2)  # shared, stage II x2, stage III x13, per seed
    summaries = json.loads((out / "study.json").read_text())["summaries"]
    assert set(summaries) == {"paper", "moe_llava"}
    for protocol, summary in summaries.items():
        assert list(summary["variants"]) == VARIANTS
        for v, stats in summary["variants"].items():
            assert stats["num_seeds"] == 2, (protocol, v)
            for key, stat in stats.items():
                if key == "num_seeds":
                    continue
                if v == "dense" and key in EXPERT_METRICS:
                    assert stat is None  # a dense model has no experts to compare
                else:
                    assert stat is not None and math.isfinite(stat["mean"]) and stat["num_values"] == 2, (protocol, v, key)
        assert set(summary["diffs"]) == set(VARIANTS) - {"copy+linear"}
        assert summary["diffs"]["evolution+dtr"]["pope_acc_bootstrap"]["num_resamples"] == study_report.NUM_RESAMPLES
        assert (out / f"plot_{protocol}.png").stat().st_size > 10_000
    md = (out / "study.md").read_text()
    assert md.count("| evolution+dtr | 2 |") == 2 and md.count("| noise+linear |") == 4  # summary + diff rows
    # every stage III run keeps its answers per question, for the bootstrap
    row = json.loads(next((out / "results").glob("*paper__evolution_dtr.json")).read_text())
    assert len(row["pope_correct"]) == 16 and set(row["pope_correct"]) <= {0, 1}
    assert sum(row["pope_correct"]) / 16 == pytest.approx(row["pope_acc"])
    # a rerun of the finished study redoes nothing and reports the same tables
    again = _study(out, data_root)
    assert again.returncode == 0, again.stderr[-3000:]
    assert " done " not in again.stdout
    assert json.loads((out / "study.json").read_text())["summaries"] == summaries


def _row(seed, variant, protocol, acc, loss, correct):
    expert = None if variant == "dense" else 0.5
    return {"seed": seed, "variant": variant, "protocol": protocol, "pope_acc": acc, "pope_f1": acc,
            "heldout_lm_loss": loss, "expert_output_cosine": expert, "expert_cka": expert, "js_image_text": expert,
            "shuffle_f1_drop": expert, "shuffle_loss_increase": expert, "pope_correct": correct}


def test_summary_statistics_on_hand_made_results():
    # 3 seeds; evolution+dtr's accuracy is 0.01, 0.02, 0.03 above copy+linear's: mean 0.02, std 0.01,
    # t = 0.02 / (0.01 / sqrt 3) = 2 sqrt 3, df 2, whose two-sided p is 1 - t / sqrt(t^2 + 2) = 1 - sqrt(6/7)
    base_acc, base_loss = [0.70, 0.72, 0.74], [2.0, 2.25, 2.5]  # (losses exact in binary)
    rows = []
    for i, seed in enumerate((1, 2, 3)):
        rows.append(_row(seed, "copy+linear", "paper", base_acc[i], base_loss[i], [1, 0, 0, 0]))
        rows.append(_row(seed, "evolution+dtr", "paper", base_acc[i] + 0.01 * (i + 1), base_loss[i] - 0.125,
                         [1, 1, 0, 0]))
        rows.append(_row(seed, "dense", "", 0.5, 3.0, [0, 0, 0, 0]))
        rows.append(_row(seed, "evolution+dtr", "moe_llava", 0.0, 0.0, [0, 0, 0, 0]))  # another protocol: ignored
    s = study_report.summarize(rows, "paper", ["dense", "copy+linear", "evolution+dtr"])
    acc = s["variants"]["evolution+dtr"]["pope_acc"]
    assert acc["mean"] == pytest.approx(0.74) and acc["std"] == pytest.approx(0.03) and acc["num_values"] == 3
    assert s["variants"]["dense"]["expert_output_cosine"] is None and s["variants"]["dense"]["num_seeds"] == 3
    d = s["diffs"]["evolution+dtr"]["pope_acc"]
    assert d["mean_difference"] == pytest.approx(0.02)
    assert d["t"] == pytest.approx(2 * math.sqrt(3))
    assert d["p_value"] == pytest.approx(1 - math.sqrt(6 / 7), abs=1e-9)
    # a constant loss difference: the t statistic is infinite, p = 0
    assert s["diffs"]["evolution+dtr"]["heldout_lm_loss"]["mean_difference"] == -0.125
    assert s["diffs"]["evolution+dtr"]["heldout_lm_loss"]["p_value"] == 0.0
    # the bootstrap over questions: question 2 right for evolution+dtr, wrong for copy+linear in every seed
    boot = s["diffs"]["evolution+dtr"]["pope_acc_bootstrap"]
    assert boot["difference"] == pytest.approx(0.25)
    assert 0.0 <= boot["low"] <= 0.25 <= boot["high"] <= 1.0
    assert "copy+linear" not in s["diffs"]
    md = study_report.tables(s, ["dense", "copy+linear", "evolution+dtr"])
    assert "| evolution+dtr | 3 | 0.740 ± 0.030 |" in md
    assert "| evolution+dtr | +0.250 [" in md and "+0.020 (p=0.074)" in md
