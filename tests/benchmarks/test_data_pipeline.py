"""benchmarks/synthetic_llava_mix.py (deterministic, shaped as specified, valid for LlavaDataset) and
benchmarks/data_pipeline.py (a smoke run at tiny sizes: every table complete, its numbers consistent)."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_evomoe.data.build_bundled import build_bundled_dataset
from megatron_evomoe.data.llava_dataset import LlavaDataset
from megatron_evomoe.data.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import data_pipeline  # noqa: E402
import synthetic_llava_mix as mix  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundled")
    return Path(build_bundled_dataset(str(root), num_images=20, num_test_images=4, seed=0)["tokenizer"])


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    images = tmp_path_factory.mktemp("images")
    return images, mix.write_image_pool(images / "pool", (16, 40), seed=0, num_files=6)


def test_mix_is_deterministic_a_prefix_and_shaped_like_llava(tmp_path, tokenizer_dir, pool):
    images, names = pool
    n = mix.CHUNK + 500  # two chunks: the second one partial
    a = mix.generate(tmp_path / "a.json", n, 3, mix.LLAVA, tokenizer_dir, names)
    b = mix.generate(tmp_path / "b.json", n, 3, mix.LLAVA, tokenizer_dir, names)
    short = mix.generate(tmp_path / "short.json", 700, 3, mix.LLAVA, tokenizer_dir, names)
    other = mix.generate(tmp_path / "other.json", 700, 4, mix.LLAVA, tokenizer_dir, names)
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    records = json.loads((tmp_path / "a.json").read_text())
    assert json.loads((tmp_path / "short.json").read_text()) == records[:700]  # same seed: a prefix
    assert json.loads((tmp_path / "other.json").read_text()) != records[:700]
    assert np.array_equal(short.lengths, a.lengths[:700]) and not np.array_equal(other.lengths, short.lengths)
    text_only = [r for r in records if "image" not in r]
    assert len(text_only) == a.num_text_only
    # text-only share: binomial(n, 6.1 %), 4 standard deviations
    share = mix.TEXT_ONLY_SHARE
    assert abs(a.num_text_only / n - share) < 4 * np.sqrt(share * (1 - share) / n)
    # turns as drawn: the truncated geometric law, each count within 4 standard deviations
    drawn = np.bincount(a.drawn_turns, minlength=mix.MAX_TURNS + 1)[1:] / n
    p = mix.turn_probabilities()
    assert np.isclose(p.sum(), 1) and p[0] / p[1] == pytest.approx(1 / mix.TURN_DECAY)
    assert np.all(np.abs(drawn - p) < 4 * np.sqrt(p * (1 - p) / n)), (drawn, p)
    turns = np.array([len(r["conversations"]) // 2 for r in records])
    assert np.array_equal(turns, a.turns) and turns.min() == 1 and turns.max() == mix.MAX_TURNS
    assert np.all(a.turns <= a.drawn_turns)  # fitting seq_len only drops turns
    for r in records:
        roles = [t["from"] for t in r["conversations"]]
        assert roles == ["human", "gpt"] * (len(roles) // 2)
        tags = [t["value"].count("<image>") for t in r["conversations"]]
        assert tags == [int("image" in r)] + [0] * (len(tags) - 1)
    assert {r["image"] for r in records if "image" in r} <= {f"pool/{name}" for name in names}
    assert len({r["id"] for r in records}) == n
    # LLaVA-1.5's geometry: the mean length gives about the issue's 61 % padding unpacked
    assert 0.55 < a.padding(2048) < 0.67 and a.lengths.max() <= 2048


def test_every_record_is_valid_for_llava_dataset_with_its_predicted_length(tmp_path, tokenizer_dir, pool):
    images, names = pool
    geometry = mix.Geometry(16, 96)  # the demo's: most records must be cut to fit
    stats = mix.generate(tmp_path / "demo.json", 400, 0, geometry, tokenizer_dir, names)
    tokenizer = load_tokenizer(str(tokenizer_dir))
    ds = LlavaDataset(tmp_path / "demo.json", images, tokenizer, 96, 16, 32)  # raises on any bad record
    assert len(ds) == 400 and ds.skipped == {} and stats.lengths.max() <= 96
    assert np.array_equal(ds.lengths, stats.lengths)  # record_length = the real tokenisation's length
    assert not any((ds.tokens(i)[0] == tokenizer.unk_id).any() for i in range(len(ds)))  # no unknown word
    assert stats.num_text_tokens(geometry) == int(ds.lengths.sum()) - 16 * sum(p is not None for p in ds.image_paths)
    assert ds.image(next(i for i, p in enumerate(ds.image_paths) if p)).shape == (3, 32, 32)  # real image files


def test_smoke_run_prints_complete_consistent_tables(tmp_path, tokenizer_dir, capsys):
    out = tmp_path / "result.json"
    assert data_pipeline.main(["--records", "300", "--legacy-records", "100", "--workers", "0",
                               "--loader-records", "64", "--loader-batches", "2", "--train-steps", "1", "--train-warmup", "0",
                               "--tokenizer", str(tokenizer_dir), "--work-dir", str(tmp_path / "work"),
                               "--json-out", str(out)]) == 0
    text = capsys.readouterr().out
    result = json.loads(out.read_text())
    tables = result["tables"]
    assert list(tables) == list(data_pipeline.COLUMNS) and all(title in text for title in tables)
    assert result["machine"] in text and not (tmp_path / "work").exists()  # named machine; work dir removed
    start = {(r["path"], r["records"]): r for r in tables["start-up, one rank (fresh process each)"]}
    today = start[("today (b400fdc): parse + tokenise to int64", 100)]
    extrapolated = start[("today (b400fdc), extrapolated", 300)]
    assert today["wall_s"] > 0 and today["peak_rss_mib"] >= today["rss_after_imports_mib"] > 0
    assert extrapolated["wall_s"] == pytest.approx(3 * today["wall_s"]) and "NOT measured" in extrapolated["note"]
    growth = today["peak_rss_mib"] - today["rss_after_imports_mib"]
    assert extrapolated["peak_rss_mib"] == pytest.approx(today["rss_after_imports_mib"] + 3 * growth)
    index_rows = [r for (path, _), r in start.items() if path.startswith("token index")]
    assert index_rows and all(r["note"].startswith("measured") and r["wall_s"] > 0 or r["note"].startswith("not available")
                              for r in index_rows)
    (size,) = tables["token index size"]
    assert size["records"] == 300 and size["text_tokens"] > 0
    if size["index_bytes"] is not None:
        assert size["bytes_per_text_token"] == pytest.approx(size["index_bytes"] / size["text_tokens"])
    step, loader = tables["loader vs the demo's training step (demo geometry)"]
    assert step["samples_per_s"] > 0 and loader["workers"] == 0 and loader["samples_per_s"] > 0
    assert loader["vs_training_step"] == pytest.approx(loader["samples_per_s"] / step["samples_per_s"])
    unpacked, packed = tables["padding at seq_len 2048"]
    assert unpacked["rows"] == 300 and 0 <= unpacked["padding"] < 1
    assert packed["padding"] is None and packed["note"].startswith("not available") or \
        0 <= packed["padding"] < unpacked["padding"] and packed["rows"] < 300
    targets = {r["target"]: r for r in tables["issue 13 targets"]}
    assert len(targets) == len(data_pipeline.TARGETS)
    assert targets["padding with packing"]["measured"] == packed["padding"]
    assert targets["index bytes per text token"]["measured"] == size["bytes_per_text_token"]
    for r in targets.values():  # "met" is the comparison of the figure with the threshold
        op, threshold = r["threshold"].split()
        value = r["measured"]
        expected = "not available" if value is None else \
            ("yes" if (value <= float(threshold) if op == "<=" else value >= float(threshold)) else "NO")
        assert r["met"] == expected, r
