"""benchmarks/train_throughput.py runs from one command and prints both tables (tiny sizes)."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_prints_side_by_side_and_scaling_tables():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), "--hidden", "32", "--ffn", "64",
           "--layers", "1", "--heads", "4", "--kv-heads", "2", "--vocab", "64", "--seq", "16", "--batch", "2",
           "--experts", "4", "--sweep", "4", "--quick", "--threads", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    names = ("megatron_evomoe ", "  without caching allocator", "  and with PyTorch-only ops", "transformers")
    rows = {name: line for line in text.splitlines() for name in names if line.startswith(name)}
    assert set(rows) == set(names), text
    for line in rows.values():  # experts, step s, tokens/s, peak MiB, ratio: all positive numbers
        nums = [float(v) for v in re.findall(r"\d+\.?\d*", line[38:])]
        assert nums[0] == 4 and len(nums) == 5 and all(v > 0 for v in nums), line
    assert re.search(r"Mixtral\s+4\s+[\d.]+\s+\d+\s+\d+\s+1\.00x", text), text
    scaling = text.split("expert scaling")[1].splitlines()
    assert int(scaling[2].split()[0]) == 4 and float(scaling[2].split()[2]) == 1.0, text
