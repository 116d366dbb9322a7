"""Issue #7 bad-input corpus: each broken input of bad_inputs.py gives its clear error (naming the
field, file and record) or, with data.skip_bad_samples=true, a counted skip; and no bad input found
mid-run loses work that was not checkpointed.

The unit tests of tests/data and tests/test_config.py check the details of single cases; this is
the table of all of them in one place, plus what only the trainer and the CLI can show.
"""
import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from megatron_evomoe.config import ConfigError, load_config
from megatron_evomoe.data.errors import DataError
from megatron_evomoe.data.llava_dataset import LlavaDataset
from megatron_evomoe.data.sampler import ResumableSampler
from megatron_evomoe.data.tokenizer import load_tokenizer
from megatron_evomoe import checkpointing as ckpt
from megatron_evomoe.training.data_setup import DataBundle
from megatron_evomoe.training.stage_data import StageData
from megatron_evomoe.training.trainer import Trainer
from tests.reliability.bad_inputs import (CONFIG_CASES, FILE_CASES, RECORD_CASES, corrupt_image, good_records,
                                          make_corpus, record_id, with_bad_record, write_records)
from tests.training.tiny_config import TINY

ROOT = Path(__file__).resolve().parents[2]
SEQ_LEN, IMAGE_TOKENS, IMAGE_SIZE = 84, 4, 16  # as tests/training/tiny_config.py sets them
PROJECTOR = "{{name: p, trainable: ['projector.*'], data: {data}, steps: {steps}, eval: false}}"


def ids(case):
    return case.name


@pytest.fixture(scope="module")
def corpus(data_root, tmp_path_factory):
    return make_corpus(Path(data_root), tmp_path_factory.mktemp("corpus") / "data")


@pytest.fixture(scope="module")
def tok(corpus):
    return load_tokenizer(str(corpus / "tokenizer"))


def dataset(corpus, tok, path, **kw):
    return LlavaDataset(path, corpus / "images", tok, SEQ_LEN, IMAGE_TOKENS, IMAGE_SIZE, **kw)


def where(path, index, rid=None):
    """The start of a DataError message about record `index` of `path`, as a regexp."""
    return "^" + re.escape(f"{path}: record {index}" + (f" (id={rid!r})" if rid is not None else "") + ": ")


# ----------------------------------------------------------------------------- records

@pytest.mark.parametrize("case", RECORD_CASES, ids=ids)
def test_bad_record_is_a_clear_error_or_a_counted_skip(corpus, tok, case):
    records, bad = with_bad_record(corpus, case)
    path = write_records(corpus / f"record_{case.name}.json", records)
    expected = where(path, 3, record_id(bad) if case.has_id else None) + case.error
    kw = {}
    if case.lazy:  # reading the file does not decode images: found when the sample is drawn ...
        ds = dataset(corpus, tok, path)
        assert len(ds) == 7 and ds.skipped == {}
        ds[2]
        with pytest.raises(DataError, match=expected):
            ds[3]
        kw = {"check_images": True}  # ... or up front on request
    with pytest.raises(DataError, match=expected) as info:
        dataset(corpus, tok, path, **kw)
    assert info.value.reason == case.reason and "\n" not in str(info.value)
    kept = dataset(corpus, tok, path, skip_bad_samples=True, **kw)
    assert kept.skipped == {case.reason: 1} and kept.num_records == 7
    assert kept.record_indices == [0, 1, 2, 4, 5, 6]


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("case", FILE_CASES, ids=ids)
def test_unusable_data_file_is_an_error_even_when_skipping(corpus, tok, case, skip):
    path = corpus / case.filename
    path.write_bytes(case.content)
    with pytest.raises(DataError, match="^" + re.escape(f"{path}: ") + case.error):
        dataset(corpus, tok, path, skip_bad_samples=skip)


def test_a_file_of_only_bad_records_is_an_error_when_skipping(corpus, tok):
    path = write_records(corpus / "all_bad.json", [case.make(r) for case, r in
                                                   zip(RECORD_CASES[:5], good_records(corpus, 5))])
    with pytest.raises(DataError, match=re.escape(f"{path}: no usable records (5 read, skipped: {{'bad_record': 3, "
                                                  "'missing_conversations': 1, 'bad_conversations': 1})")):
        dataset(corpus, tok, path, skip_bad_samples=True)


# ----------------------------------------------------------------------------- config

@pytest.mark.parametrize("case", CONFIG_CASES, ids=ids)
def test_bad_config_names_the_field(tmp_path, case):
    path = None
    if case.yaml is not None:
        path = tmp_path / "bad.yaml"
        path.write_text(case.yaml)
    with pytest.raises(ConfigError) as info:
        load_config(path, ["--stages=[{name: s, steps: 2}]", *case.overrides])
    msg = str(info.value)
    assert re.match(case.error, msg) and "\n" not in msg, msg


# ----------------------------------------------------------------------------- checkpoints

def tiny(corpus, save_dir, *extra):
    return load_config(None, [*TINY, f"--data.root={corpus}", "--data.build_if_missing=false",
                              f"--train.save_dir={save_dir}", *extra])


TWO_STAGES = ("--stages=[{name: p, trainable: ['projector.*'], data: captions.json, steps: 1, eval: false},"
              "{name: w, trainable: ['llm.*'], steps: 1, eval: false}]")


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """A finished two-stage tiny run (hidden_size 32): latest checkpoint = stage w, step 1."""
    save = tmp_path_factory.mktemp("trained") / "run"
    Trainer(tiny(corpus, save, TWO_STAGES)).run()
    return save


def copy_run(trained, tmp_path):
    return shutil.copytree(trained, tmp_path / "run")


def latest_meta(save_dir):
    return json.loads((ckpt.find_latest(save_dir) / "meta.json").read_text())


# another hidden size: the first tensor that differs has 32 in the checkpoint where the model has 64
SHAPES = (r"shape of [\w.]+: checkpoint \([\d, ]*\b32\b[\d, ]*\) vs model \([\d, ]*\b64\b[\d, ]*\); "
          r"config differs: model\.hidden_size=32 in the checkpoint, 64 now")


def test_resume_from_another_model_size_names_the_tensor_and_both_shapes(corpus, trained, tmp_path):
    run = copy_run(trained, tmp_path)
    stages = TWO_STAGES.replace("steps: 1", "steps: 2")  # stage w has a step left, so it resumes
    with pytest.raises(ckpt.CheckpointError, match=r"^resume: the checkpoint of stage 'w' step 1 in .* does not fit "
                                                   r"the configured model \(" + SHAPES + r"\); use a new train"):
        Trainer(tiny(corpus, run, stages, "--model.hidden_size=64")).run()
    assert latest_meta(run)["global_step"] == 2  # untouched


def test_resume_with_another_trainable_set_is_a_checkpoint_error(corpus, trained, tmp_path):
    stages = TWO_STAGES.replace("steps: 1", "steps: 2").replace("['llm.*']", "['llm.layers.0.*']")
    with pytest.raises(ckpt.CheckpointError, match=r"^resume: .* its optimizer state does not fit this stage's "
                                                   r"trainable parameters .* was stages\.w\.trainable changed\?"):
        Trainer(tiny(corpus, copy_run(trained, tmp_path), stages)).run()


def test_resume_from_a_stage_the_config_lacks(corpus, trained, tmp_path):
    one = "--stages=[{name: p, trainable: ['projector.*'], data: captions.json, steps: 1, eval: false}]"
    with pytest.raises(ckpt.CheckpointError, match=r"^resume: .*01-w-step000001 is from stage 2, but the config "
                                                   r"has 1 stages"):
        Trainer(tiny(corpus, copy_run(trained, tmp_path), one)).run()


def test_resume_after_the_data_file_lost_records(corpus, trained, tmp_path):
    data = shutil.copytree(corpus, tmp_path / "data")
    instruct = json.loads((data / "instruct.json").read_text())
    write_records(data / "instruct.json", instruct[:-1])
    stages = TWO_STAGES.replace("steps: 1", "steps: 2")
    with pytest.raises(DataError, match=re.escape(f"{data / 'instruct.json'}: cannot continue the checkpoint's data "
                                                  f"stream: sampler state has num_samples={len(instruct)} but")):
        Trainer(tiny(data, copy_run(trained, tmp_path), stages)).run()


def test_corrupt_checkpoint_file_is_named(corpus, trained, tmp_path):
    run = copy_run(trained, tmp_path)
    state = ckpt.find_latest(run) / "state.pt"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(ckpt.CheckpointError, match=re.escape(f"{state}: cannot be read")):
        Trainer(tiny(corpus, run, TWO_STAGES)).run()


def test_init_from_a_folder_without_checkpoints(corpus, tmp_path):
    empty = tmp_path / "nothing_here"
    empty.mkdir()
    with pytest.raises(ckpt.CheckpointError, match=r"^train\.init_from: .*nothing_here: neither a checkpoint folder"):
        Trainer(tiny(corpus, tmp_path / "run", TWO_STAGES, f"--train.init_from={empty}")).run()
    assert not (tmp_path / "run" / "checkpoints").exists()


# ----------------------------------------------------------------------------- found mid-run

def test_image_unreadable_mid_run_keeps_the_steps_done_and_resumes_identically(corpus, tmp_path):
    """save_interval=0 (stage ends only): without the checkpoint taken on the error, steps 1-2 were lost."""
    data = shutil.copytree(corpus, tmp_path / "data")
    stage = "--stages=[" + PROJECTOR.format(data="captions.json", steps=4) + "]"
    reference = Trainer(tiny(data, tmp_path / "ref", stage, "--train.save_interval=0")).run()
    # the caption drawn first in step 3 (batches of 4; the stage's seed is train.seed 42 + 1000 * stage 0)
    records = json.loads((data / "captions.json").read_text())
    sampler = ResumableSampler(len(records), seed=42)
    index = sampler.global_index(8)
    image = data / "images" / records[index]["image"]
    assert all(records[sampler.global_index(k)]["image"] != image.name for k in range(8))  # not drawn before
    good = corrupt_image(image)

    run = tmp_path / "run"
    trainer = Trainer(tiny(data, run, stage, "--train.save_interval=0"))
    with pytest.raises(DataError, match=where(data / "captions.json", index, records[index]["id"]) +
                       r"field 'image': " + re.escape(str(image)) + ": cannot decode image"):
        trainer.run()
    meta = latest_meta(run)
    assert (meta["global_step"], meta["stage_end"]) == (2, False)
    assert [h["loss"] for h in trainer.history] == [h["loss"] for h in reference[:2]]

    image.write_bytes(good)  # fixed: the same command resumes at step 3 and continues the same trajectory
    resumed = Trainer(tiny(data, run, stage, "--train.save_interval=0")).run()
    assert [(h["global_step"], h["loss"]) for h in resumed] == [(h["global_step"], h["loss"]) for h in reference[2:]]


def test_skipping_stops_when_no_sample_can_be_loaded(corpus, tok, tmp_path):
    lazy = [case for case in RECORD_CASES if case.lazy]
    path = write_records(corpus / "unloadable.json", [c.make(r) for c, r in zip(lazy, good_records(corpus, 4))])
    cfg = tiny(corpus, tmp_path / "run", "--data.skip_bad_samples=true",
               "--stages=[" + PROJECTOR.format(data="unloadable.json", steps=1) + "]")
    data = StageData(DataBundle(corpus, tok), cfg.stages[0], cfg, seed=0)
    with pytest.raises(DataError, match=re.escape(f"{path}: no sample could be loaded: all {len(lazy)} samples "
                                                  f"failed (skipped: {{'corrupt_image': {len(lazy)}}})")):
        data.next_batches(1)
    assert data.num_skipped == len(lazy) and data.state_dict()["position"] == 0  # rewound to the step's start


def test_eval_image_unreadable_after_a_stage_keeps_the_stage(corpus, tmp_path):
    data = shutil.copytree(corpus, tmp_path / "data")
    question = json.loads((data / "pope_test.jsonl").read_text().splitlines()[0])
    image = data / "images" / question["image"]
    corrupt_image(image)
    stage = "--stages=[" + PROJECTOR.format(data="captions.json", steps=1).replace("eval: false", "eval: true") + "]"
    run = tmp_path / "run"
    expected = where(data / "pope_test.jsonl", 0, question["question_id"]) + re.escape(f"field 'image': {image}: ")
    with pytest.raises(DataError, match=expected + "cannot decode image"):
        Trainer(tiny(data, run, stage)).run()
    meta = latest_meta(run)
    assert (meta["global_step"], meta["stage_end"]) == (1, True)
    assert Trainer(tiny(data, run, stage)).run() == []  # the rerun finds the stage done


def test_bad_eval_record_stops_before_training(corpus, tmp_path):
    data = shutil.copytree(corpus, tmp_path / "data")
    lines = (data / "pope_test.jsonl").read_text().splitlines()
    lines[1] = json.dumps({**json.loads(lines[1]), "label": "maybe"})
    (data / "pope_test.jsonl").write_text("\n".join(lines) + "\n")
    stage = "--stages=[" + PROJECTOR.format(data="captions.json", steps=1).replace("eval: false", "eval: true") + "]"
    with pytest.raises(DataError, match=where(data / "pope_test.jsonl", 1, 1) + "field 'label': must be 'yes' or"):
        Trainer(tiny(data, tmp_path / "run", stage)).run()
    assert not (tmp_path / "run" / "checkpoints").exists()


# ----------------------------------------------------------------------------- the command line

def tiny_cli(corpus, save_dir, *extra):
    return [*TINY, f"--data.root={corpus}", "--data.build_if_missing=false", f"--train.save_dir={save_dir}", *extra]


def test_cli_trains_over_bad_records_when_skipping_and_reports_the_count(corpus, tmp_path):
    """The one run in a subprocess, as users launch it."""
    # 12 good captions, then one record per case; the lazy (image) cases can only be skipped when drawn
    base = good_records(corpus, 12 + len(RECORD_CASES))
    records = base[:12] + [case.make(r) for case, r in zip(RECORD_CASES, base[12:])]
    write_records(corpus / "mixed.json", records)
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, str(ROOT / "pretrain_evomoe.py"),
                        *tiny_cli(corpus, run, "--data.skip_bad_samples=true",
                                  "--stages=[" + PROJECTOR.format(data="mixed.json", steps=4) + "]")],
                       capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    upfront = Counter(case.reason for case in RECORD_CASES if not case.lazy)
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(upfront.items()))
    assert f"mixed.json: skipped {sum(upfront.values())} of {len(records)} records ({reasons})" in r.stderr
    # 16 usable samples, batches of 4: the 4 steps draw each of them, the unreadable ones are skipped
    assert r.stderr.count("skipped a sample that cannot be loaded") == sum(case.lazy for case in RECORD_CASES)
    steps = [s for s in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "train/loss" in s]
    assert len(steps) == 4 and all(0 < s["train/loss"] < 20 for s in steps)
    assert steps[-1]["train/bad_samples_skipped"] == len(RECORD_CASES)


def cli_error(capsys, *args):
    """pretrain_evomoe.main in this process (a subprocess costs seconds of imports): exit code 2 and
    one line on stderr."""
    import pretrain_evomoe
    capsys.readouterr()
    assert pretrain_evomoe.main(list(args)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    return err.strip()


def test_cli_stops_before_training_on_a_bad_record_of_a_later_stage(corpus, tmp_path, capsys):
    records, bad = with_bad_record(corpus, RECORD_CASES[4], n_good=8, at=5)  # conversations is a string
    path = write_records(corpus / "later_stage.json", records)
    stages = ("--stages=[" + PROJECTOR.format(data="captions.json", steps=2) + ","
              "{name: w, trainable: ['llm.*'], data: later_stage.json, steps: 2, eval: false}]")
    err = cli_error(capsys, *tiny_cli(corpus, tmp_path / "run", stages))
    assert err == f"error: {path}: record 5 (id={bad['id']!r}): field 'conversations': must be a list of turns, got str"
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing was trained


def test_cli_init_from_another_model_size(corpus, trained, tmp_path, capsys):
    err = cli_error(capsys, *tiny_cli(corpus, tmp_path / "run", TWO_STAGES, f"--train.init_from={trained}",
                                      "--model.hidden_size=64"))
    assert re.match(r"error: train\.init_from: .*01-w-step000001 does not fit the configured model \(" + SHAPES +
                    r"\); the model/vision sections must describe the same architecture$", err), err


def test_cli_yaml_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {hidden_size: 32\ntrain:\n  seed: 1\n")
    err = cli_error(capsys, "--config", str(bad), "--dry-run")
    assert err == f"config error: {bad}:2:6: invalid YAML: expected ',' or '}}', but got ':'"
