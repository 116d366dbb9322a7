"""The generation CLI and the eval wiring, end to end on a tiny checkpoint trained here."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from megatron_evomoe.data.conversation import render_prompt
from megatron_evomoe.eval.model_answers import main as answers_main
from megatron_evomoe.eval.model_answers import make_answer_fn
from megatron_evomoe.generate import generate_texts, image_processor_for
from megatron_evomoe.generate import main as generate_main
from megatron_evomoe.generation import greedy_generate

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "Is there a red circle in the image?"


# `trained` (a tiny run of all four stages, loaded for inference) is a session fixture in tests/conftest.py,
# shared with the benchmark runners' end-to-end tests (tests/eval/test_eval_end_to_end.py).


def image(trained, i=0):
    return str(trained["data"] / "images" / f"test_{i:05d}.png")


def reference_answer(trained, prompt, img, max_new_tokens):
    """What the library's greedy decoder (generation.py) answers, for the same template and image."""
    model, cfg, tok = trained["model"], trained["cfg"], trained["bundle"].tokenizer
    ids = torch.tensor(render_prompt(f"<image>\n{prompt}", tok, cfg.vision.num_image_tokens))
    pixels = image_processor_for(cfg)(img)[None]
    out = greedy_generate(model, [ids], pixels, max_new_tokens, tok.eos_id)[0]
    return tok.decode(out, skip_special_tokens=True).strip()


def test_cli_end_to_end_greedy(trained):
    """`python -m megatron_evomoe.generate` in a fresh process prints the greedy answer."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "megatron_evomoe.generate", "--ckpt", str(trained["run"]),
                           "--image", image(trained), "--prompt", QUESTION, "--max-new-tokens", "6"],
                          capture_output=True, text=True, timeout=300, cwd=trained["root"], env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rstrip("\n") == reference_answer(trained, QUESTION, image(trained), 6)


def test_batched_prompts_equal_one_at_a_time(trained, capsys):
    prompts = [QUESTION, "What shapes are in the image?", "Is there a blue square in the image?"]
    imgs = [image(trained, i) for i in range(3)]
    args = ["--ckpt", str(trained["run"]), "--max-new-tokens", "5", "--json"]
    for p, img in zip(prompts, imgs):
        args += ["--prompt", p, "--image", img]
    assert generate_main(args) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == prompts and [r["image"] for r in rows] == imgs
    for r in rows:
        assert r["answer"] == reference_answer(trained, r["prompt"], r["image"], 5)
    assert any(r["answer"] for r in rows)  # not vacuous: the model does say something


def sample(trained, seed, stop=(), temperature=2.0, n=12):
    model, cfg, tok = trained["model"], trained["cfg"], trained["bundle"].tokenizer
    ids = render_prompt(f"<image>\n{QUESTION}", tok, cfg.vision.num_image_tokens)
    pixels = image_processor_for(cfg)(image(trained))[None]
    return generate_texts(model, tok, [ids], pixels, max_new_tokens=n, temperature=temperature, seed=seed,
                          stop=stop)[0]


def test_sampling_is_seeded(trained):
    assert sample(trained, 1) == sample(trained, 1)
    assert len({sample(trained, s) for s in range(6)}) > 1


def test_stop_string_ends_the_answer(trained):
    full = ""
    for seed in range(20):  # a sampled answer long enough to cut
        full = sample(trained, seed)
        if len(full.split()) >= 3:
            break
    words = full.split()
    assert len(words) >= 3, full
    stop = words[2]
    cut = sample(trained, seed, stop=[stop])
    assert cut == full[: full.find(stop)].strip() and stop not in cut


def test_cli_errors_exit_2(trained, capsys):
    run = str(trained["run"])
    assert generate_main(["--ckpt", run, "--prompt", "a", "--prompt", "b", "--prompt", "c",
                          "--image", image(trained), "--image", image(trained)]) == 2
    assert "give one image, or one per prompt" in capsys.readouterr().err
    assert generate_main(["--ckpt", run, "--prompt", "<image> what is it?"]) == 2
    assert "no image was given" in capsys.readouterr().err
    assert generate_main(["--ckpt", str(trained["root"] / "nope"), "--prompt", "x"]) == 2


def test_answer_fn_and_eval_cli(trained, tmp_path, capsys):
    fn = make_answer_fn(trained["model"], trained["cfg"], trained["bundle"], max_new_tokens=3)
    assert fn(image(trained), QUESTION) == reference_answer(trained, QUESTION, image(trained), 3)
    assert isinstance(fn(None, "what colour is a circle?"), str)  # text-only questions work too
    result = answers_main(["--ckpt", str(trained["run"]), "--benchmark", "pope",
                           "--data", str(trained["data"] / "pope_test.jsonl"), "--images",
                           str(trained["data"] / "images"), "--out", str(tmp_path / "eval"), "--limit", "4",
                           "--max-new-tokens", "3"])
    saved = json.loads((tmp_path / "eval" / "pope.json").read_text())
    assert saved["metrics"]["num_questions"] == 4 == len(saved["questions"])
    assert result["metrics"]["accuracy"] == saved["metrics"]["accuracy"]
    q = saved["questions"][0]
    img = str(trained["data"] / "images" / q["image"])
    assert q["answer"] == reference_answer(trained, q["prompt"], img, 3)
    assert "accuracy" in capsys.readouterr().out  # the runner's table
