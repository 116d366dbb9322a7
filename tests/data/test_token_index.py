"""The token index: exact round trip against direct tokenisation, compact storage, rebuilt when stale,
never read half-written, built by one process of many, and data.overlong's counts."""
import json
import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_evomoe.data.conversation import IGNORE_INDEX, render_conversation
from megatron_evomoe.data.conversation_templates import DEFAULT_TEMPLATE
from tests.data.test_data_llava_dataset import NO_SYSTEM
from megatron_evomoe.data.errors import DataError
from megatron_evomoe.data.llava_dataset import LlavaDataset
from megatron_evomoe.data.token_index import MANIFEST, open_index
from megatron_evomoe.data.tokenizer import WordTokenizer, load_tokenizer
from megatron_evomoe.process_identity import HOST

ROOT = Path(__file__).resolve().parents[2]
N_IMG, SIZE = 16, 16
BUILT = "token index built"


@pytest.fixture(scope="module")
def tok(data_root):
    return load_tokenizer(str(data_root / "tokenizer"))


def dataset(path, tok, index_dir, seq_len=96, **kw):
    return LlavaDataset(path, Path(path).parent / "images", tok, seq_len, N_IMG, SIZE, index_dir=index_dir, **kw)


def builds(caplog) -> int:
    return sum(BUILT in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("name", ["captions.json", "instruct.json"])
def test_every_bundled_record_round_trips_exactly(data_root, tok, tmp_path, name):
    ds = dataset(data_root / name, tok, tmp_path)
    records = json.loads((data_root / name).read_text())
    assert len(ds) == len(records) and ds.skipped == {} and ds.num_truncated == 0
    for i, r in enumerate(records):
        want_ids, want_labels = render_conversation(r["conversations"], tok, N_IMG, has_image="image" in r)
        ids, labels = ds.tokens(i)
        assert ids.dtype == labels.dtype == torch.long
        assert ids.tolist() == want_ids and labels.tolist() == want_labels, (name, i)
        assert ds.lengths[i] == ds.num_tokens(i) == len(want_ids)
        assert ds.record_ids[i] == r["id"] and ds.record_indices[i] == i
        assert ds.image_paths[i] == (str(data_root / "images" / r["image"]) if "image" in r else None)
    sample = ds[0]  # padded as before
    n = len(ds.tokens(0)[0])
    assert (sample["input_ids"][n:] == tok.pad_id).all() and (sample["labels"][n:] == IGNORE_INDEX).all()


def test_storage_is_compact(data_root, tok, tmp_path):
    ds = dataset(data_root / "captions.json", tok, tmp_path)
    m = ds.index.manifest
    assert m["dtype"] == "uint8" and tok.vocab_size <= 256  # the smallest type that holds the bundled ids
    records = json.loads((data_root / "captions.json").read_text())
    text = sum(len(render_conversation(r["conversations"], tok, 0 if "image" not in r else 1, "image" in r)[0])
               for r in records) - sum("image" in r for r in records)  # one stored image id per image record
    assert m["num_text_tokens"] == text and m["num_images"] == sum("image" in r for r in records)
    assert ds.index.num_text_tokens.sum() == text and ds.index.has_image.tolist() == ["image" in r for r in records]
    # Each image is ONE stored id, not N_IMG copies: 1 byte per stored token.
    assert os.path.getsize(Path(ds.index_folder) / "tokens.bin") == text + m["num_images"]
    assert m["num_distinct_images"] == len({r["image"] for r in records if "image" in r})
    # The whole folder: its fixed part (the .npy headers, the manifest) and per record, beside its tokens,
    # one byte each of length, image position, span count, its code of the image and that image's folder
    # code (these images are distinct), 2 of span runs (gap, length), the id "cap_00000" (9 + 1 of length)
    # and the file name "train_00000.png" (15 + 1): 33 bytes beside ~23 text tokens.  On LLaVA-sized
    # records (~220 text tokens, ~7 answers) the same tables come to ~2.2 bytes per text token.
    folder = Path(ds.index_folder)
    fixed = 128 * len(list(folder.glob("*.npy"))) + (folder / MANIFEST).stat().st_size
    per_record = (ds.index.file_bytes() - fixed - (text + m["num_images"])) / len(records)
    print(f"bytes per text token: {ds.index.file_bytes() / text:.2f} (without the fixed part "
          f"{(ds.index.file_bytes() - fixed) / text:.2f}); per record beside the tokens: {per_record:.1f}")
    assert abs(per_record - 33) < 0.1  # (+1 byte in all: the one, empty, folder name's length)


def test_jsonl_and_json_and_worker_processes_give_the_same_index(data_root, tok, tmp_path):
    records = json.loads((data_root / "instruct.json").read_text())
    (tmp_path / "images").symlink_to(data_root / "images")
    jsonl = tmp_path / "instruct.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    a = dataset(data_root / "instruct.json", tok, tmp_path / "a")
    b = dataset(jsonl, tok, tmp_path / "b")
    c = open_index(data_root / "instruct.json", data_root / "images", tok, 96, N_IMG, template=DEFAULT_TEMPLATE,
                   index_dir=tmp_path / "c", num_workers=2)  # the pool path, on a file too small to pick it
    assert len(a) == len(b) == len(c) == len(records)
    for i in range(len(a)):
        want = [t.tolist() for t in a.tokens(i)]
        assert [t.tolist() for t in b.tokens(i)] == want
        assert [t.tolist() for t in c.tokens(i, tok.image_token_id)] == want
    assert list(c.record_ids) == list(a.record_ids) == [r["id"] for r in records]


def test_dataset_pickles_as_paths(data_root, tok, tmp_path):
    ds = dataset(data_root / "captions.json", tok, tmp_path)
    blob = pickle.dumps(ds)
    assert b"tokens.bin" not in blob and len(blob) < 64 * 1024
    copy = pickle.loads(blob)
    assert [t.tolist() for t in copy.tokens(3)] == [t.tolist() for t in ds.tokens(3)]
    assert torch.equal(copy[3]["image"], ds[3]["image"])


def _copy_data(data_root, tmp_path, name="captions.json"):
    (tmp_path / "images").symlink_to(data_root / "images")
    path = tmp_path / name
    path.write_text((data_root / name).read_text())
    return path


def test_a_stale_index_is_rebuilt_and_a_touched_one_reused(data_root, tok, tmp_path, caplog):
    path = _copy_data(data_root, tmp_path)
    idx = tmp_path / "idx"
    with caplog.at_level(logging.INFO, logger="megatron_evomoe.data.token_index"):
        first = dataset(path, tok, idx)
        dataset(path, tok, idx)
        assert builds(caplog) == 1
        os.utime(path, ns=(1, 10**18))  # touched, same content: reused (hash compared once, then the stat)
        assert dataset(path, tok, idx).index_folder == first.index_folder and builds(caplog) == 1
        assert json.loads((Path(first.index_folder) / MANIFEST).read_text())["source"]["mtime_ns"] == 10**18
        records = json.loads(path.read_text())
        records[0]["conversations"][1]["value"] = "a red circle."  # changed input: rebuilt, same folder
        path.write_text(json.dumps(records))
        changed = dataset(path, tok, idx)
        assert builds(caplog) == 2 and changed.index_folder == first.index_folder
        assert changed.tokens(0)[0].tolist() == render_conversation(records[0]["conversations"], tok, N_IMG, True)[0]
        shorter = dataset(path, tok, idx, seq_len=95)  # changed seq_len: another index
        assert builds(caplog) == 3 and shorter.index_folder != first.index_folder
        other_tok = WordTokenizer(tok.tokens[:5] + sorted(tok.tokens[5:]))  # changed tokenizer: another index
        assert dataset(path, other_tok, idx).index_folder not in (first.index_folder, shorter.index_folder)
        assert builds(caplog) == 4


def test_a_half_written_index_is_never_used(data_root, tok, tmp_path, caplog):
    path = _copy_data(data_root, tmp_path)
    idx = tmp_path / "idx"
    folder = Path(dataset(path, tok, idx).index_folder)
    with caplog.at_level(logging.INFO, logger="megatron_evomoe.data.token_index"):
        (folder / MANIFEST).unlink()  # a folder without manifest (as a crash before the rename cannot leave,
        (folder / "tokens.bin").write_bytes(b"\xff" * 8)  # but a copy or a hand edit could)
        ds = dataset(path, tok, idx)
        assert builds(caplog) == 1 and ds.tokens(0)[0].tolist()[0] == tok.bos_id
        # A builder killed mid-write leaves its temporary folder: ignored, and cleaned once its pid is gone.
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout.strip()
        tmp = idx / f".tmp-{folder.name}-{HOST}-{dead}"
        tmp.mkdir()
        (tmp / MANIFEST).write_text("{}")
        (folder / MANIFEST).unlink()
        dataset(path, tok, idx)
        assert builds(caplog) == 2 and not tmp.exists()


def test_the_lock_of_a_live_builder_is_waited_for_and_named(data_root, tok, tmp_path):
    path = _copy_data(data_root, tmp_path)
    idx = tmp_path / "idx"
    folder = Path(dataset(path, tok, idx).index_folder)
    (folder / MANIFEST).unlink()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = idx / f".build-{folder.name}" / ".lock"
        lock.parent.mkdir()
        lock.write_text(json.dumps({"host": HOST, "pid": holder.pid, "start": None, "started": "now"}))
        with pytest.raises(DataError, match=rf"another process builds \(host {HOST}, pid {holder.pid}, started now\)"):
            open_index(path, tmp_path / "images", tok, 96, N_IMG, template=DEFAULT_TEMPLATE, index_dir=idx,
                       wait_timeout_s=0.5)
    finally:
        holder.kill()
        holder.wait()
    assert len(dataset(path, tok, idx)) == len(json.loads(path.read_text()))  # holder gone: its lock taken over


_BUILDER = """
import logging, sys
sys.path.insert(0, {root!r})
logging.basicConfig(level=logging.INFO, format="%(message)s")
from megatron_evomoe.data.conversation_templates import DEFAULT_TEMPLATE
from megatron_evomoe.data.token_index import open_index
from megatron_evomoe.data.tokenizer import load_tokenizer
index = open_index({path!r}, {images!r}, load_tokenizer({tok!r}), 96, {n}, template=DEFAULT_TEMPLATE,
                   index_dir={idx!r})
print("records", len(index), index.manifest["num_text_tokens"])
"""


def test_two_processes_share_one_index_one_builds(data_root, tmp_path):
    path = _copy_data(data_root, tmp_path, "instruct.json")
    code = _BUILDER.format(root=str(ROOT), path=str(path), images=str(tmp_path / "images"),
                           tok=str(data_root / "tokenizer"), n=N_IMG, idx=str(tmp_path / "idx"))
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sum(o.count(BUILT) for o in outs) == 1, outs
    results = [o.splitlines()[-1] for o in outs]
    assert results[0] == results[1] and results[0].startswith(f"records {len(json.loads(path.read_text()))} ")
    assert len(list((tmp_path / "idx").iterdir())) == 1  # the index; no lock or temporary left


def _long_records():
    """r0 and r4 fit seq_len 24; r1 and r3 are over-long in their answers; r2's image comes after 23 tokens
    (its system turn of 20 tokens first: the tag itself always leads its turn, as LLaVA puts it)."""
    def rec(i, answer, image=True, prefix=""):
        r = {"id": f"r{i}", "conversations": [{"from": "system", "value": prefix}] * bool(prefix) + [
            {"from": "human", "value": ("<image>\n" if image else "") + "What is this?"},
            {"from": "gpt", "value": answer}]}
        if image:
            r["image"] = "img.png"
        return r
    long = " ".join(["black"] * 20)
    return [rec(0, "a red cat."), rec(1, long), rec(2, "a cat.", prefix="What is this? " * 5),
            rec(3, long, image=False), rec(4, "a cat.")]


@pytest.fixture
def long_file(tmp_path):
    from PIL import Image
    Image.new("RGB", (8, 8)).save(tmp_path / "img.png")
    path = tmp_path / "long.json"
    path.write_text(json.dumps(_long_records()))
    return path


TOK = WordTokenizer.build(["What is this ? a red cat . black"], extra_words=["USER:", "ASSISTANT:"])


def _long(path, overlong, **kw):
    return LlavaDataset(path, path.parent, TOK, 24, 4, 8, overlong=overlong, template=NO_SYSTEM, **kw)


def test_overlong_truncate_and_skip_counts_are_exact(long_file, caplog):
    with pytest.raises(DataError, match=r"record 1 \(id='r1'\): field 'conversations': is 34 tokens long"):
        _long(long_file, "error")
    with caplog.at_level(logging.WARNING, logger="megatron_evomoe.data.token_index"):
        skip = _long(long_file, "skip")
    assert skip.skipped == {"too_long": 3} and skip.num_truncated == 0 and skip.num_records == 5
    assert list(skip.record_ids) == ["r0", "r4"] and list(skip.skipped_ids) == ["r1", "r2", "r3"]
    assert "skipped 3 of 5 records (too_long=3)" in caplog.text and "'r1', 'r2', 'r3'" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="megatron_evomoe.data.token_index"):
        cut = _long(long_file, "truncate")
    # r2: BOS + its system turn (20) + USER : (2) place the image at 23; 23 + 4 slots > 24: skipped, not cut.
    assert cut.skipped == {"too_long": 1} and list(cut.skipped_ids) == ["r2"]
    assert cut.num_truncated == 2 and list(cut.truncated_ids) == ["r1", "r3"]
    assert list(cut.record_ids) == ["r0", "r1", "r3", "r4"] and cut.record_indices == [0, 1, 3, 4]
    assert "truncated 2 of 5 records to seq_len=24" in caplog.text and "'r1', 'r3'" in caplog.text
    records = _long_records()
    for k, i in ((1, 1), (2, 3)):  # the text cut at the end, the image kept: LLaVA's cut to model_max_length
        r = records[i]
        ids, labels = render_conversation(r["conversations"], TOK, 4, has_image="image" in r, template=NO_SYSTEM)
        got_ids, got_labels = cut.tokens(k)
        assert got_ids.tolist() == ids[:24] and got_labels.tolist() == labels[:24]
        assert cut[k]["input_ids"].tolist() == ids[:24]
    assert np.asarray(cut.lengths).tolist() == [len(_rendered(records[0])), 24, 24, len(_rendered(records[4]))]


def _rendered(r):
    return render_conversation(r["conversations"], TOK, 4, has_image="image" in r, template=NO_SYSTEM)[0]


def test_prepare_cli_builds_then_reuses_and_errors_in_one_line(data_root, tmp_path, capsys):
    from types import SimpleNamespace

    from megatron_evomoe.data.prepare import main, stage_files
    config = ROOT / "examples/configs/tiny_cpu.yaml"
    args = [str(config), f"--data.root={data_root}", "--data.build_if_missing=false", f"--data.index_dir={tmp_path}"]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    captions = len(json.loads((data_root / "captions.json").read_text()))
    assert len(lines) == 2 and lines[0].startswith(f"{data_root / 'captions.json'}: {captions} records, {captions} kept")
    assert all(", built: " + str(tmp_path) in line for line in lines)
    assert main(args) == 0 and all(", reused: " in line for line in capsys.readouterr().out.splitlines())
    assert main(args + ["--data.seq_len=30"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "more than seq_len=30" in err[0]
    stage = SimpleNamespace(name="s", data=[{"path": "a.json", "weight": 2}, {"path": "b.jsonl", "weight": 0.5}])
    assert stage_files(stage) == [("a.json", 2.0), ("b.jsonl", 0.5)]
    assert stage_files(SimpleNamespace(name="s", data="c.json")) == [("c.json", 1.0)]


@pytest.mark.parametrize("text", [
    '[]', ' [ ] ', '[{"a": 1}, {"b": [1, 2]}]', '[{"a": "x\\ny"},\n {"b":\n [1,\n2]}]\n', '[1 2]', '[1,]', '[1',
    '[1,', '[1] x', '\n\n[\n{"a":1},\n{"b": tru}\n]', '[{"id": "a", "conversations": [}]', '[{"id": "a", "conv'])
def test_the_streaming_reader_reads_and_fails_as_json_loads(tmp_path, monkeypatch, text):
    from megatron_evomoe.data import json_stream
    monkeypatch.setattr(json_stream, "CHUNK_CHARS", 7)  # a window far smaller than a record: it slides and grows
    path = tmp_path / "x.json"
    path.write_text(text)
    try:
        want, want_error = json.loads(text), None
    except json.JSONDecodeError as e:
        want, want_error = None, str(e)
    if want_error is None:
        assert [r for _, r, _ in json_stream.read_records(path)] == want
    else:
        with pytest.raises(DataError) as info:
            list(json_stream.read_records(path))
        assert str(info.value) == f"{path}: not valid JSON: {want_error}"


def test_the_streaming_window_stays_small(tmp_path, monkeypatch):
    """A record cut by the window's end grows the window by its unconsumed part only, so the window stays
    near one chunk however long the file (doubling it whole kept the whole file in memory by the end)."""
    from megatron_evomoe.data import json_stream
    monkeypatch.setattr(json_stream, "CHUNK_CHARS", 64)
    sizes = []
    more = json_stream._Window.more

    def recording_more(self, min_chars=64):
        grew = more(self, min_chars)
        sizes.append(len(self.text))
        return grew
    monkeypatch.setattr(json_stream._Window, "more", recording_more)
    records = [{"id": f"r{i}", "v": "x" * (i % 50)} for i in range(3000)]
    path = tmp_path / "many.json"
    path.write_text(json.dumps(records))
    assert [r for _, r, _ in json_stream.read_records(path)] == records
    assert len(sizes) > 1000 and max(sizes) <= 4 * 64
