"""LlavaDataset / PopeDataset: tensors, collate, and a DataError (or counted skip) for each bad input."""
import json
import logging
import pickle

import pytest
import torch
from PIL import Image

from megatron_evomoe.data.build_bundled import build_bundled_dataset
from megatron_evomoe.data.conversation import IGNORE_INDEX, render_prompt
from megatron_evomoe.data.conversation_templates import RoleTemplate
from megatron_evomoe.data.errors import DataError
from megatron_evomoe.data.image_processing import ImageProcessor
from megatron_evomoe.data.llava_dataset import LlavaDataset, PopeDataset
from megatron_evomoe.data.tokenizer import WordTokenizer, load_tokenizer

SIZE = 16
N_IMG = 4
TOK = WordTokenizer.build(["What is this ? a red cat . And colour ? black . Describe it Be brief"],
                          extra_words=["USER:", "ASSISTANT:"])
# vicuna_v1 without its system prompt: these tests are about the dataset, in short sequences
# (the templates themselves: test_conversation_templates.py)
NO_SYSTEM = RoleTemplate("vicuna_v1_no_system", sep2="</s>", system="")


def rec(i, image=True, answer="a red cat.", **extra):
    r = {"id": f"r{i}", "conversations": [
        {"from": "human", "value": "<image>\nWhat is this?" if image else "What is this?"},
        {"from": "gpt", "value": answer}]}
    if image:
        r["image"] = f"img{i % 3}.png"
    r.update(extra)
    return r


@pytest.fixture
def root(tmp_path):
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        Image.new("RGB", (20, 12), colour).save(tmp_path / f"img{i}.png")
    return tmp_path


def write(root, records, name="data.json"):
    path = root / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records))
    return str(path)


def make(root, records, seq_len=24, name="data.json", **kw):
    kw.setdefault("template", NO_SYSTEM)
    return LlavaDataset(write(root, records, name), str(root), TOK, seq_len=seq_len, num_image_tokens=N_IMG,
                        image_processor=SIZE, **kw)


# ----------------------------------------------------------------------------- good data

def test_getitem_pads_and_masks(root):
    ds = make(root, [rec(0), rec(1, image=False)])
    s = ds[0]
    assert s["input_ids"].dtype == torch.long and s["input_ids"].shape == (24,)
    n = ds.num_tokens(0)
    # <s> USER : <img>x4 What is this ? ASSISTANT : a red cat . </s>
    assert n == 1 + 2 + N_IMG + 4 + 2 + 4 + 1
    assert s["input_ids"][:n].tolist().count(TOK.image_token_id) == N_IMG
    assert (s["input_ids"][n:] == TOK.pad_id).all() and (s["labels"][n:] == IGNORE_INDEX).all()
    supervised = (s["labels"] != IGNORE_INDEX).nonzero().flatten().tolist()
    assert supervised == list(range(n - 5, n))  # "a red cat . </s>"
    assert TOK.decode(s["labels"][supervised]) == "a red cat. </s>"
    assert s["image"].shape == (3, SIZE, SIZE) and s["image"].dtype == torch.float32
    assert ds[1]["image"] is None and ds.num_tokens(1) == n - N_IMG


def test_collate_keeps_images_in_batch_order(root):
    ds = make(root, [rec(0, image=False), rec(1), rec(2), rec(3, image=False), rec(0)])
    batch = ds.collate([ds[i] for i in range(5)])
    assert batch["input_ids"].shape == batch["labels"].shape == (5, 24)
    assert batch["images"].shape == (3, 3, SIZE, SIZE)
    assert batch["has_image"].tolist() == [False, True, True, False, True]
    proc = ImageProcessor(SIZE)
    for k, name in enumerate(["img1.png", "img2.png", "img0.png"]):
        assert torch.equal(batch["images"][k], proc(str(root / name)))
    text_only = ds.collate([ds[0], ds[3]])
    assert text_only["images"].shape == (0, 3, SIZE, SIZE) and text_only["images"].dtype == torch.float32


def test_jsonl_reads_like_json(root):
    records = [rec(0), rec(1, image=False), rec(2)]
    a, b = make(root, records), make(root, records, name="data.jsonl")
    assert len(a) == len(b) == 3
    for i in range(3):
        assert torch.equal(a[i]["input_ids"], b[i]["input_ids"]) and torch.equal(a[i]["labels"], b[i]["labels"])


def test_bundled_data_loads_with_its_tokenizer(tmp_path):
    paths = build_bundled_dataset(str(tmp_path / "b"), num_images=20, num_test_images=6, seed=0)
    tok = load_tokenizer(paths["tokenizer"])
    for key in ("captions", "instruct"):
        ds = LlavaDataset(paths[key], paths["images"], tok, seq_len=96, num_image_tokens=16, image_processor=32)
        assert ds.skipped == {} and len(ds) == len(json.load(open(paths[key])))
        assert all(tok.unk_id not in ds[i]["input_ids"].tolist() for i in range(len(ds)))
    pope = PopeDataset(paths["pope_test"], paths["images"], tok, num_image_tokens=16, image_processor=32)
    lines = [json.loads(x) for x in open(paths["pope_test"])]
    assert len(pope) == len(lines)
    sample = pope[0]
    image, prompt_ids, label = sample[:3]
    assert image.shape == (3, 32, 32) and label == lines[0]["label"] and sample.question_id == 0
    assert prompt_ids.tolist() == render_prompt("<image>\n" + lines[0]["text"], tok, 16)
    assert tok.decode(prompt_ids[-2:]) == "ASSISTANT:"
    assert prompt_ids.tolist().count(tok.image_token_id) == 16


# ----------------------------------------------------------------------------- bad data

def expect_error(root, records, *parts, name="data.json", **kw):
    with pytest.raises(DataError) as info:
        make(root, records, name=name, **kw)
    msg = str(info.value)
    for part in (name,) + parts:
        assert part in msg, f"{part!r} not in {msg!r}"
    return info.value


def test_missing_image_file(root):
    err = expect_error(root, [rec(0), rec(1, image=True) | {"image": "nope.png"}],
                       "record 1 (id='r1')", "field 'image'", "nope.png")
    assert err.reason == "missing_image" and isinstance(err, ValueError)
    copy = pickle.loads(pickle.dumps(err))  # survives DataLoader workers
    assert str(copy) == str(err) and (copy.field, copy.index, copy.reason) == ("image", 1, "missing_image")


def test_malformed_records(root):
    expect_error(root, [rec(0), {"id": "x", "image": "img0.png"}], "record 1 (id='x')", "field 'conversations'",
                 "is missing")
    expect_error(root, [rec(0), rec(1) | {"conversations": "What?"}], "record 1 (id='r1')",
                 "field 'conversations'", "must be a list")
    expect_error(root, [rec(0), rec(1), ["not", "a", "record"]], "record 2", "must be a JSON object")
    bad_turn = rec(1)
    bad_turn["conversations"][1]["value"] = 42
    expect_error(root, [rec(0), bad_turn], "record 1 (id='r1')", "field 'conversations[1].value'", "int")
    expect_error(root, [rec(0) | {"image": 7}], "record 0", "field 'image'", "non-empty string")
    expect_error(root, [rec(0) | {"id": [1]}], "record 0", "field 'id'")


def test_image_tag_without_image_and_image_without_tag(root):
    no_image = rec(0)
    del no_image["image"]
    expect_error(root, [no_image], "record 0 (id='r0')", "field 'image'", "<image> tag but the record has no image")
    no_tag = rec(1, image=False) | {"image": "img1.png"}
    expect_error(root, [rec(0), no_tag], "record 1 (id='r1')", "field 'conversations[0].value'",
                 "has no <image> tag")


def test_over_long_sample_errors_or_is_counted(root, caplog):
    long_answer = " ".join(["black"] * 20)
    records = [rec(0), rec(1, answer=long_answer), rec(2, image=False), rec(3, answer=long_answer)]
    expect_error(root, records, "record 1 (id='r1')", "field 'conversations'", "seq_len=24")
    with caplog.at_level(logging.WARNING, logger="megatron_evomoe.data.llava_dataset"):
        ds = make(root, records, skip_bad_samples=True)
    assert ds.skipped == {"too_long": 2}
    assert len(ds) == 2 and ds.record_ids == ["r0", "r2"] and ds.record_indices == [0, 2]
    summary = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(summary) == 1 and "skipped 2 of 4 records (too_long=2)" in summary[0]
    assert "\n" not in summary[0]
    # A longer seq_len accepts them all.
    assert len(make(root, records, seq_len=40)) == 4


def test_skip_counts_each_reason(root):
    records = [rec(0), rec(1) | {"image": "gone.png"}, {"id": "c"}, rec(3, image=False) | {"image": "img0.png"},
               rec(4), "junk"]
    ds = make(root, records, skip_bad_samples=True)
    assert ds.skipped == {"missing_image": 1, "missing_conversations": 1, "image_tag_mismatch": 1,
                          "bad_record": 1}
    assert ds.record_ids == ["r0", "r4"] and ds.num_records == 6
    with pytest.raises(DataError, match="no usable records"):
        make(root, ["junk"], skip_bad_samples=True)


def test_bad_jsonl_line_and_bad_json_file(root):
    path = root / "data.jsonl"
    path.write_text(json.dumps(rec(0)) + "\n{not json\n" + json.dumps(rec(2)) + "\n")
    with pytest.raises(DataError, match=r"data\.jsonl: record 1: line 2 is not valid JSON"):
        LlavaDataset(str(path), str(root), TOK, 24, N_IMG, SIZE, template=NO_SYSTEM)
    ds = LlavaDataset(str(path), str(root), TOK, 24, N_IMG, SIZE, skip_bad_samples=True, template=NO_SYSTEM)
    assert ds.skipped == {"bad_json": 1} and len(ds) == 2
    (root / "obj.json").write_text(json.dumps({"a": 1}))
    with pytest.raises(DataError, match=r"obj\.json: expected a JSON list"):
        LlavaDataset(str(root / "obj.json"), str(root), TOK, 24, N_IMG, SIZE, template=NO_SYSTEM)


def test_truncated_png(root):
    big = Image.effect_noise((64, 64), 50).convert("RGB")  # incompressible, so truncation cuts pixel data
    big.save(root / "trunc.png")
    full = (root / "trunc.png").read_bytes()
    (root / "trunc.png").write_bytes(full[: len(full) // 2])
    records = [rec(0), rec(1) | {"image": "trunc.png"}]
    ds = make(root, records)  # pixels are decoded lazily
    assert ds[0]["image"] is not None
    with pytest.raises(DataError) as info:
        ds[1]
    msg = str(info.value)
    assert "trunc.png" in msg and "record 1 (id='r1')" in msg and "cannot decode image" in msg
    # Checked up front on request, and then skippable.
    expect_error(root, records, "record 1 (id='r1')", "field 'image'", "trunc.png", check_images=True)
    ds = make(root, records, check_images=True, skip_bad_samples=True)
    assert ds.skipped == {"corrupt_image": 1} and len(ds) == 1


def test_pope_dataset_errors(root):
    good = {"question_id": 0, "image": "img0.png", "text": "What is this?", "label": "yes"}
    path = root / "pope.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(good | {"question_id": 1, "label": "maybe"}) + "\n")
    with pytest.raises(DataError, match=r"pope\.jsonl: record 1 \(id=1\): field 'label': must be 'yes' or 'no'"):
        PopeDataset(str(path), str(root), TOK, N_IMG, SIZE)
    path.write_text(json.dumps(good | {"image": "missing.png"}) + "\n")
    with pytest.raises(DataError, match=r"pope\.jsonl: record 0 \(id=0\): field 'image'.*missing\.png"):
        PopeDataset(str(path), str(root), TOK, N_IMG, SIZE)
    unlabeled = {k: v for k, v in good.items() if k != "label"}
    path.write_text(json.dumps(unlabeled) + "\n")
    assert PopeDataset(str(path), str(root), TOK, N_IMG, SIZE)[0].label is None
