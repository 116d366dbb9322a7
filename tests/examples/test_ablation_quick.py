"""The ablation's --quick mode end to end (CI runs it; the full run is recorded in examples/ablation/RESULTS.md)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_ablation_produces_the_table(tmp_path, data_root):
    out = tmp_path / "ablation"
    r = subprocess.run([sys.executable, str(ROOT / "examples/ablation/run_ablation.py"), "--quick", "--out", str(out),
                        "--threads", "1", f"--data-root={data_root}"],
                       capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {row["variant"]: row for row in json.loads((out / "ablation.json").read_text())["rows"]}
    assert set(rows) == {"dense", "copy+linear", "copy+dtr", "evolution+linear", "evolution+dtr", "drop+linear"}
    for name, row in rows.items():
        assert 0.0 <= row["pope_acc"] <= 1.0 and row["train_lm_loss"] > 0, name
    assert rows["dense"]["expert_output_cosine"] is None  # dense has no experts to compare
    assert -1.0 <= rows["evolution+dtr"]["expert_output_cosine"] <= 1.0
    assert "| evolution+dtr |" in (out / "ablation.md").read_text()
