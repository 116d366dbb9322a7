"""benchmarks/train_throughput.py runs from one command and prints its tables (tiny sizes): the step's
FLOPs (counted = hand-derived), the GEMM roofline, the side-by-side rows with their fraction of it,
and the expert scaling. The compiled rows are left out here (--no-compile): inductor's cold compile
of even this tiny model takes minutes on 2 cores."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# The tiny config's forward + backward FLOPs by hand: 1 layer, T = 2 x 16 tokens, hidden 32, FFN 64,
# top-2 of 4 experts, 4 heads of 8 / 2 KV heads, vocab 64. Per token, multiply-adds: experts
# 2 * 3 * 32 * 64 = 12288, q k v o 32 * (32 + 16 + 16 + 32) = 3072, router 32 * 4 = 128;
# attention 4 * B * H * S^2 * D = 4 * 2 * 4 * 256 * 8; LM head 2 * T * 32 * 64; backward = 2 x forward.
TINY_FLOPS = 3 * (2 * 32 * (12288 + 3072 + 128) + 4 * 2 * 4 * 256 * 8 + 2 * 32 * 32 * 64)


def test_prints_flops_roofline_side_by_side_and_scaling_tables():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), "--hidden", "32", "--ffn", "64",
           "--layers", "1", "--heads", "4", "--kv-heads", "2", "--vocab", "64", "--seq", "16", "--batch", "2",
           "--experts", "4", "--sweep", "4", "--quick", "--threads", "1", "--no-compile"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    counted = re.search(r"FlopCounterMode Mixtral ([\d.]+), ours ([\d.]+); hand count ([\d.]+)", text)
    assert counted and all(float(v) == round(TINY_FLOPS / 1e9, 6) for v in counted.groups()), (TINY_FLOPS, text)
    square = float(re.search(r"square ([\d.]+) GFLOP/s", text).group(1))
    assert square > 0, text
    names = ("megatron_evomoe ", "  without caching allocator", "  and with PyTorch-only ops", "transformers")
    rows = {name: line for line in text.splitlines() for name in names if line.startswith(name)}
    assert set(rows) == set(names), text
    for line in rows.values():  # experts, step s, tokens/s, GFLOP/s, of peak, peak MiB, ratio; no compile time
        nums = [float(v) for v in re.findall(r"\d+\.?\d*", line[44:])]
        assert nums[0] == 4 and len(nums) == 7 and all(v > 0 for v in nums[:4] + nums[5:]), line
        step_s, tokens_s, gflops, of_peak = nums[1], nums[2], nums[3], nums[4]
        # the step time is printed to 1 ms, too coarse at this size: tokens/s (2 x 16 tokens a step) carries it
        assert abs(tokens_s * step_s - 2 * 16) <= 0.0005 * tokens_s + step_s, line  # both printed rounded
        assert abs(gflops - TINY_FLOPS * tokens_s / (2 * 16) / 1e9) <= 0.051 + 0.01 * gflops, line  # printed rounded
        assert abs(of_peak - gflops / square) <= 0.006 + 0.01 * of_peak, line
        assert line.rstrip().endswith("-"), line
    assert re.search(r"Mixtral\s+4\s+[\d.]+\s+\d+\s+[\d.]+\s+[\d.]+\s+\d+\s+1\.00x", text), text
    scaling = text.split("expert scaling")[1].splitlines()
    assert int(scaling[2].split()[0]) == 4 and float(scaling[2].split()[2]) == 1.0, text
