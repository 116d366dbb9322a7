"""Issue 16: no wrong input trains silently, and every entry point answers bad input with one line.

- a YAML config with a key set twice, or bytes that are not UTF-8: a ConfigError naming the file,
  the key path and both lines (or the byte offset);
- config combinations that only failed later (stage names that are not path-safe, an evolve stage
  with no evolved expert, an evolution seed torch refuses, ...): a ConfigError naming the field;
- images of every PNG/JPEG mode: 16-bit grey scaled, every kind of transparency on white, CMYK by
  PIL; the exact pixel values, hand-computed, for files and in-memory images alike;
- ranks launched with different configs: the same ConfigError on every rank naming the field;
- every CLI: out-of-range numbers, missing files, folders that are not what they should be: exit
  status 2 and one line on stderr;
- the stage-end POPE file: checked with the training files' rules before any training.
"""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import pretrain_evomoe
from megatron_evomoe.config import ConfigError, load_config
from megatron_evomoe.convert import evomoe_to_hf, hf_to_evomoe
from megatron_evomoe.convert.__main__ import main as convert_main
from megatron_evomoe.data.errors import DataError
from megatron_evomoe.data.image_modes import to_rgb
from megatron_evomoe.data.image_processing import ImageProcessor, load_image
from megatron_evomoe.eval import runner
from megatron_evomoe.eval.model_answers import main as answers_main
from megatron_evomoe.generate import main as generate_main
from megatron_evomoe.parallel.config_agreement import agree_on_config, describe_difference
from megatron_evomoe.parallel.launch import main as launch_main
from megatron_evomoe.parallel.reshard import main as reshard_main
from megatron_evomoe.parallel.state import ParallelState
from megatron_evomoe.tools.report import main as report_main
from megatron_evomoe.training.data_setup import check_stage_data, prepare_data
from tests.convert.helpers import make_run
from tests.parallel.dist_utils import run_distributed
from tests.training.tiny_config import STAGES, TINY

STAGE = "--stages=[{name: s, steps: 2}]"


def config_error(*overrides, path=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def exits_2(capsys, main, *args) -> str:
    """main(args) in this process: exit status 2 (returned or raised) and exactly one line on stderr."""
    capsys.readouterr()
    try:
        code = main(list(map(str, args)))
    except SystemExit as e:
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


# ============================================================================ YAML files

def test_duplicate_top_level_key_names_file_key_and_both_lines(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("model:\n  hidden_size: 64\ntrain:\n  seed: 1\nmodel:\n  num_layers: 2\n")
    assert config_error(STAGE, path=path) == (f"{path}:5: duplicate key 'model' (first set on line 1, again on "
                                              "line 5; YAML would keep only the last)")


def test_duplicate_key_inside_a_stage(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("stages:\n  - name: a\n    steps: 3\n  - name: b\n    lr: 0.1\n    steps: 2\n    lr: 0.2\n")
    assert config_error(path=path).startswith(f"{path}:7: duplicate key 'stages[1].lr' (first set on line 5, "
                                              "again on line 7;")


def test_duplicate_key_in_a_command_line_override():
    assert config_error("--stages=[{name: a, steps: 1, steps: 2}]").startswith(
        "--stages:1: duplicate key 'stages[0].steps' (first set on line 1, again on line 1;")


def test_anchors_and_merge_keys_are_not_duplicates(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("stages:\n  - &base {name: a, steps: 3, lr: 0.01}\n  - {<<: *base, name: b, steps: 5}\n")
    cfg = load_config(path)
    assert [(s.name, s.steps, s.lr) for s in cfg.stages] == [("a", 3, 0.01), ("b", 5, 0.01)]


def test_non_utf8_byte_names_file_and_offset(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("model:\n  hidden_size: 64\n# caf\xe9\n".encode("latin-1"))
    assert config_error(STAGE, path=path) == (f"{path}: not UTF-8 text: byte 0xe9 at offset 30 (line 3); save the "
                                              "config as UTF-8")


# ============================================================================ cross-field rules

@pytest.mark.parametrize("name, message", [
    ("a/b", "'a/b' holds '/'; use only letters, digits, '.', '_' and '-'"),
    ('"a\\0b"', "'a\\x00b' holds '\\x00'; use only letters"),
    ("'two words'", "'two words' holds ' '; use only letters"),
    ("..", "'..' must not start with '.' or contain '..'"),
    (".hidden", "'.hidden' must not start with '.' or contain '..'"),
    ("a..b", "'a..b' must not start with '.' or contain '..'"),
])
def test_stage_name_must_be_path_safe(name, message):
    assert config_error(f"--stages=[{{name: {name}}}]").startswith(f"stages[0].name: {message}")


def test_stage_names_that_are_path_safe_pass():
    cfg = load_config(None, ["--stages=[{name: stage-1.a_B}, {name: '2'}]"])
    assert [s.name for s in cfg.stages] == ["stage-1.a_B", "2"]


def test_evolve_stage_with_no_evolved_expert():
    msg = config_error("--stages=[{name: e, moe_mode: evolve}]", "--moe.num_experts=1", "--evolution.beta_ranges=[]")
    assert msg == ("stages[0].moe_mode: 'evolve' needs at least one evolved expert: moe.num_experts >= 2, one "
                   "evolution.beta_ranges entry each")


@pytest.mark.parametrize("override, message", [
    ("--evolution.seed=18446744073709551616",
     "evolution.seed: must be in [0, 2**64) (torch's seed range), got 18446744073709551616"),
    ("--evolution.seed=-1", "evolution.seed: must be in [0, 2**64) (torch's seed range), got -1"),
    ("--evolution.beta_ranges=[[true, true], [0.8, 0.89], [0.7, 0.79]]",
     "evolution.beta_ranges[0]: must be [low, high] with 0 <= low <= high <= 1, got [True, True]"),
    ("--train.save_dir=", "train.save_dir: must not be empty (checkpoints would land in the current folder)"),
])
def test_values_that_failed_only_when_used(override, message):
    assert config_error(STAGE, override) == message


def test_moe_pattern_without_moe_layers_would_train_nothing():
    msg = config_error("--stages=[{name: r, trainable: ['llm.layers.{moe}.mlp.*']}]", "--moe.layers=none")
    assert msg == "stages[0].trainable: a '{moe}' pattern needs MoE layers, but moe.layers='none' selects none"


# ============================================================================ image modes

def pixels(img: Image.Image) -> list:
    return [tuple(p) for p in np.asarray(img).reshape(-1, 3).tolist()]


def same_tensor_for_file_and_memory(path, img):
    proc = ImageProcessor(4)
    assert torch.equal(proc(path), proc(img))


GREY16 = [0, 128, 1000, 25700, 32896, 65535]
GREY8 = [(0,) * 3, (0,) * 3, (4,) * 3, (100,) * 3, (128,) * 3, (255,) * 3]  # round(v / 257): 3.89 -> 4, 0.5 -> 0


@pytest.mark.parametrize("mode, dtype", [("I;16", "<u2"), ("I;16B", ">u2")])
def test_16_bit_grey_is_scaled_not_clipped_to_white(tmp_path, mode, dtype):
    img = Image.frombytes(mode, (6, 1), np.array(GREY16, dtype=dtype).tobytes())
    path = tmp_path / "grey16.png"
    img.save(path)
    assert Image.open(path).mode == "I;16"
    assert pixels(load_image(path)) == GREY8
    same_tensor_for_file_and_memory(path, img)


def test_32_bit_grey_holds_16_bit_samples():
    img = Image.fromarray(np.array([[-5, 70000, 514, 65535]], dtype=np.int32))
    assert img.mode == "I"
    assert pixels(to_rgb(img)) == [(0,) * 3, (255,) * 3, (2,) * 3, (255,) * 3]  # clipped to 0..65535, then / 257


def test_every_transparency_is_composited_on_white(tmp_path):
    # alpha 128 over white: out = round((v * 128 + 255 * 127) / 255)
    cases = {
        "rgba.png": (Image.new("RGBA", (1, 1), (100, 50, 0, 128)), (177, 152, 127)),
        "la.png": (Image.new("LA", (1, 1), (200, 128)), (227, 227, 227)),
    }
    pal = Image.new("P", (2, 1))
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putpixel((1, 0), 1)
    pal.info["transparency"] = 1  # palette entry 1 (blue) fully transparent
    for name, (img, rgb) in cases.items():
        img.save(tmp_path / name)
        assert Image.open(tmp_path / name).mode == img.mode
        assert pixels(load_image(tmp_path / name)) == [rgb], name
        same_tensor_for_file_and_memory(tmp_path / name, img)
    pal.save(tmp_path / "p.png")
    assert pixels(load_image(tmp_path / "p.png")) == [(255, 0, 0), (255, 255, 255)]
    same_tensor_for_file_and_memory(tmp_path / "p.png", pal)


def test_cmyk_jpeg_goes_through_pil_conversion(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (10, 20, 30, 40)).save(path, quality=100)  # uniform: JPEG keeps it exactly
    assert Image.open(path).mode == "CMYK"
    # R = round((255 - C) * (255 - K) / 255): 245 * 215 / 255 = 206.6; G: 235 * 215 / 255 = 198.1; B: 189.7
    assert set(pixels(load_image(path))) == {(207, 198, 190)}


# ============================================================================ ranks agree on the config

def _agree(rank, world_size, overrides):
    cfg = load_config(None, [STAGE, *overrides[rank]])
    try:
        agree_on_config(ParallelState.build(cfg, rank, world_size), cfg)
    except ConfigError as e:
        return str(e)
    return "agreed"


def test_ranks_with_different_configs_stop_with_the_field_named():
    same = run_distributed(_agree, 2, [[], []])
    assert same == ["agreed", "agreed"]
    msgs = run_distributed(_agree, 2, [["--train.seed=1"], ["--train.seed=2", "--stages.s.lr=0.5"]])
    expected = ("train.seed: differs between ranks (1 on rank 0; 2 on rank 1); launch every rank with the same "
                "config file and overrides")
    assert msgs == [expected, expected]


def test_one_process_agrees_without_torch_distributed():
    cfg = load_config(None, [STAGE])
    assert agree_on_config(ParallelState.single(cfg), cfg) is None


def test_difference_groups_ranks_and_counts_stages():
    trees = [{"train": {"seed": 1}, "stages": [{"name": "a"}]}, {"train": {"seed": 7}, "stages": [{"name": "a"}]},
             {"train": {"seed": 1}, "stages": [{"name": "a"}]}]
    assert describe_difference(trees).startswith("train.seed: differs between ranks (1 on ranks 0, 2; 7 on rank 1)")
    trees = [{"stages": [{"name": "a"}]}, {"stages": [{"name": "a"}, {"name": "b"}]}]
    assert describe_difference(trees).startswith("len(stages): differs between ranks (1 on rank 0; 2 on rank 1)")


# ============================================================================ command lines

@pytest.mark.parametrize("flag, value, message", [
    ("--temperature", "nan", "argument --temperature: must be a finite number >= 0, got nan"),
    ("--temperature", "-0.5", "argument --temperature: must be a finite number >= 0, got -0.5"),
    ("--max-new-tokens", "0", "argument --max-new-tokens: must be >= 1, got 0"),
    ("--top-p", "0", "argument --top-p: must be a finite number in (0, 1], got 0"),
])
def test_generate_numbers(capsys, tmp_path, flag, value, message):
    err = exits_2(capsys, generate_main, "--ckpt", tmp_path, "--prompt", "hi", flag, value)
    assert err == f"python -m megatron_evomoe.generate: error: {message} (see --help)"


def test_generate_on_a_folder_without_meta(capsys, tmp_path):
    (tmp_path / "state.pt").write_bytes(b"not read: meta.json is missing")
    err = exits_2(capsys, generate_main, "--ckpt", tmp_path, "--prompt", "hi")
    assert err == f"error: {tmp_path}: not a complete checkpoint (missing state.pt or meta.json)"


@pytest.fixture(scope="module")
def pope_files(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("pope")
    rows = [json.loads(line) for line in (data_root / "pope_test.jsonl").read_text().splitlines()[:4]]
    (out / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "a.jsonl").write_text("".join(json.dumps({"question_id": r["question_id"], "answer": "yes"}) + "\n"
                                         for r in rows))
    return out, data_root / "images"


@pytest.mark.parametrize("limit", [-1, 0])
def test_runner_limit_below_one(capsys, pope_files, limit):
    out, images = pope_files
    err = exits_2(capsys, runner.main, "--benchmark", "pope", "--data", out / "q.jsonl", "--images", images,
                  "--answers-jsonl", out / "a.jsonl", "--out-dir", out / "res", "--limit", limit)
    assert err == (f"python -m megatron_evomoe.eval.runner: error: argument --limit: must be >= 1, got {limit} "
                   "(see --help)")
    with pytest.raises(ValueError, match=r"^pope: limit must be >= 1 \(None: every question\), got -1$"):
        runner.score_answers("pope", str(out / "q.jsonl"), str(images), {}, str(out / "res"), limit=-1)


def test_runner_missing_and_binary_question_files(capsys, pope_files):
    out, images = pope_files
    args = ["--benchmark", "pope", "--images", images, "--answers-jsonl", out / "a.jsonl", "--out-dir", out / "res"]
    assert exits_2(capsys, runner.main, *args, "--data", out / "nope.jsonl") == \
        f"error: {out / 'nope.jsonl'}: No such file or directory"
    png = next(images.iterdir())
    assert exits_2(capsys, runner.main, *args, "--data", png) == \
        f"error: pope: {png}: not UTF-8 text (invalid start byte at byte 0)"


def test_runner_answers_file_not_utf8_names_the_file(capsys, pope_files, tmp_path):
    out, images = pope_files
    answers = tmp_path / "a.jsonl"
    answers.write_bytes(b'{"question_id": 1, "answer": "\xff"}\n')
    assert exits_2(capsys, runner.main, "--benchmark", "pope", "--data", out / "q.jsonl", "--images", images,
                   "--answers-jsonl", answers, "--out-dir", tmp_path / "res") == \
        f"error: {answers}: not UTF-8 text (invalid start byte at byte 30)"


def test_model_answers_limit_and_missing_checkpoint(capsys, pope_files, tmp_path):
    out, images = pope_files
    args = ["--benchmark", "pope", "--data", out / "q.jsonl", "--images", images, "--out", tmp_path]
    assert exits_2(capsys, answers_main, "--ckpt", tmp_path, *args, "--limit", "0").endswith(
        "error: argument --limit: must be >= 1, got 0 (see --help)")
    assert exits_2(capsys, answers_main, "--ckpt", tmp_path / "none", *args) == (
        f"error: {tmp_path / 'none'}: neither a checkpoint folder (meta.json with state.pt or DCP .metadata) nor a run folder with "
        "complete checkpoints")


def test_report_numbers_and_incomplete_checkpoint(capsys, tmp_path):
    assert exits_2(capsys, report_main, tmp_path, "--out", tmp_path / "r", "--num-samples", "0") == \
        "python -m megatron_evomoe.tools.report: error: argument --num-samples: must be >= 1, got 0 (see --help)"
    (tmp_path / "state.pt").write_bytes(b"")
    assert exits_2(capsys, report_main, tmp_path, "--out", tmp_path / "r") == \
        f"error: {tmp_path}: not a complete checkpoint (missing state.pt or meta.json)"


def test_reshard_layout(capsys, tmp_path):
    assert exits_2(capsys, reshard_main, tmp_path, "--layout", "tp2").endswith(
        "argument --layout: expected a layout name such as tp2-pp1-ep2-dp2, got 'tp2' (see --help)")
    (tmp_path / "ranks" / "tp1-pp1-ep1-dp2").mkdir(parents=True)
    assert exits_2(capsys, reshard_main, tmp_path, "--layout", "tp2-pp1-ep1-dp1") == (
        f"error: {tmp_path}: no per-rank checkpoints of layout tp2-pp1-ep1-dp1 (layouts found: tp1-pp1-ep1-dp2)")


def test_launch_world_size(capsys):
    assert exits_2(capsys, launch_main, "--world-size", "0") == \
        "python -m megatron_evomoe.parallel.launch: error: argument --world-size: must be >= 1, got 0 (see --help)"


@pytest.mark.parametrize("args, message", [
    (["hf-to-evomoe", "--src", "s", "--dst", "d", "--max-seq-len", "0"],
     "argument --max-seq-len: must be >= 1, got 0"),
    (["evomoe-to-hf", "--src", "s", "--dst", "d", "--max-shard-size", "0"],
     "argument --max-shard-size: must be at least 1 byte, got '0'"),
    (["evomoe-to-hf", "--src", "s", "--dst", "d", "--max-shard-size", "5XB"],
     "argument --max-shard-size: expected bytes or a size such as 5GB or 500MiB, got '5XB'"),
])
def test_convert_numbers(capsys, args, message):
    err = exits_2(capsys, convert_main, *args)
    assert err == f"python -m megatron_evomoe.convert {args[0]}: error: {message} (see --help)"


# ============================================================================ HF folders

@pytest.fixture(scope="module")
def llama_dirs(tmp_path_factory):
    """A LLaMA-layout HF folder in one file and the same in 4 shards with an index."""
    root = tmp_path_factory.mktemp("hf")
    run, _, _ = make_run(root / "ours", "--vision.enabled=false", "--moe.layers=none",
                         "--stages=[{name: s, steps: 1}]")
    quiet = dict(echo=lambda s: None)
    evomoe_to_hf(run, root / "one", "llama", **quiet)
    evomoe_to_hf(run, root / "sharded", "llama", max_shard_size=40_000, **quiet)
    return root


def edited(llama_dirs, tmp_path, which="one", **changes):
    folder = shutil.copytree(llama_dirs / which, tmp_path / "src")
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("field, value", [("num_attention_heads", 0), ("num_attention_heads", "4"),
                                          ("num_key_value_heads", 0), ("hidden_size", 32.0)])
def test_hf_head_counts_and_sizes(capsys, llama_dirs, tmp_path, field, value):
    src = edited(llama_dirs, tmp_path, **{field: value})
    err = exits_2(capsys, convert_main, "hf-to-evomoe", "--src", src, "--dst", tmp_path / "run")
    assert err == f"conversion error: {src / 'config.json'}: field {field!r} must be an integer >= 1, got {value!r}"


def test_hf_index_names_a_shard_without_the_tensor(capsys, llama_dirs, tmp_path):
    src = edited(llama_dirs, tmp_path, which="sharded")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 2
    moved = next(k for k, f in index["weight_map"].items() if f == files[0])
    index["weight_map"][moved] = files[1]
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    err = exits_2(capsys, convert_main, "hf-to-evomoe", "--src", src, "--dst", tmp_path / "run")
    assert err == (f"conversion error: {src / 'model.safetensors.index.json'}: maps tensor {moved!r} to {files[1]}, "
                   "which does not contain it")


def test_training_into_an_imported_run_folder(capsys, llama_dirs, tmp_path):
    run = tmp_path / "imported"
    hf_to_evomoe(llama_dirs / "one", run, echo=lambda s: None)
    err = exits_2(capsys, pretrain_evomoe.main, STAGE, f"--train.save_dir={run}")
    assert err == (f"config error: train.save_dir: {run} holds the imported checkpoint 00-imported (weights only, "
                   f"nothing to resume); train from it with --train.init_from={run} and a new --train.save_dir")
    assert [p.name for p in (run / "checkpoints").iterdir() if p.is_dir()] == ["00-imported"]  # nothing trained


# ============================================================================ the stage-end POPE file

def pope_bundle(data_root, pope_path):
    cfg = load_config(None, TINY + [STAGES, f"--data.root={data_root}", "--data.build_if_missing=false",
                                    f"--data.eval_split={pope_path}"])
    return prepare_data(cfg), cfg


def write_pope(tmp_path, data_root, edit) -> tuple:
    rows = [json.loads(line) for line in (data_root / "pope_test.jsonl").read_text().splitlines()[:5]]
    edit(rows[2])
    path = tmp_path / "pope.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows[2]["question_id"]


@pytest.mark.parametrize("edit, error", [
    (lambda r: r.update(text="<image> <image> " + r["text"]),
     "field 'text': holds 2 <image> tags; one image per sample is supported"),
    (lambda r: r.pop("label"), "field 'label': is missing (the evaluation scores the answers against it)"),
    (lambda r: r.update(text=r["text"] + " red" * 60),
     "field 'text': is 107 tokens long after tokenisation (including 4 image tokens); at most 93 leave room for the "
     "answer within model.max_seq_len"),
])
def test_pope_question_checked_before_training(data_root, tmp_path, edit, error):
    path, qid = write_pope(tmp_path, data_root, edit)
    bundle, cfg = pope_bundle(data_root, path)
    with pytest.raises(DataError) as info:
        check_stage_data(bundle, cfg, cfg.stages)
    assert str(info.value) == f"{path}: record 2 (id={qid!r}): {error}"


def test_evaluation_without_a_vision_tower(data_root):
    cfg = load_config(None, TINY + [STAGES, f"--data.root={data_root}", "--data.build_if_missing=false",
                                    "--vision.enabled=false"])
    with pytest.raises(ConfigError) as info:
        check_stage_data(prepare_data(cfg), cfg, cfg.stages)
    assert str(info.value) == ("stages.router.eval: the stage-end POPE evaluation asks about images, but "
                               "vision.enabled=false; set eval: false (or data.num_eval_samples=0)")


def test_empty_pope_file(data_root, tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    bundle, cfg = pope_bundle(data_root, tmp_path / "empty.jsonl")
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'empty.jsonl'}: has no questions")):
        check_stage_data(bundle, cfg, cfg.stages)


def test_cli_reports_the_pope_question_before_training(data_root, tmp_path, capsys):
    path, qid = write_pope(tmp_path, data_root, lambda r: r.update(text="<image> <image> " + r["text"]))
    save = tmp_path / "run"
    err = exits_2(capsys, pretrain_evomoe.main, *TINY, STAGES, f"--data.root={data_root}",
                  "--data.build_if_missing=false", f"--data.eval_split={path}", f"--train.save_dir={save}")
    assert err == (f"error: {path}: record 2 (id={qid!r}): field 'text': holds 2 <image> tags; one image per sample "
                   "is supported")
    assert not (save / "checkpoints").exists()  # nothing was trained
