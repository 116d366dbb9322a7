"""The paper's recipes (examples/configs/evomoe_*.yaml) and their SLURM script.

Each recipe holds the paper's settings (top-1 of 4 experts on every other layer (MoE-LLaVA's even ones), the per-stage batch sizes
and learning rates, the four stages, a template and an image mode, init_from of the converted checkpoint)
and validates as the trainer reads it; the SLURM script converts the weights when they are missing and
passes them as --train.init_from.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_evomoe.config import load_config

ROOT = Path(__file__).resolve().parents[2]
RECIPES = {  # name -> (HF LLM, template of stages I-III, vision image mode)
    "evomoe_qwen2_0.5b_clip336": ("Qwen/Qwen2-0.5B", "phi", "pad"),
    "evomoe_stablelm_1.6b_clip336": ("stabilityai/stablelm-2-1_6b", "stablelm", "pad"),
    "evomoe_qwen_1.8b_clip336": ("Qwen/Qwen-1_8B", "phi", "pad"),
    "evomoe_phi2_clip336": ("microsoft/phi-2", "phi", "pad"),
    "evomoe_phi2_siglip384": ("microsoft/phi-2", "phi", "resize"),
    "evomoe_openchat_7b_clip336": ("openchat/openchat-3.5-1210", "openchat", "pad"),
}
SBATCH = ROOT / "examples/slurm/evomoe_paper.sbatch"


def recipe_tree(name):
    return yaml.safe_load((ROOT / "examples/configs" / f"{name}.yaml").read_text())


def test_every_paper_recipe_is_listed():
    found = {p.stem for p in (ROOT / "examples/configs").glob("evomoe_*.yaml")}
    assert found == set(RECIPES)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_holds_the_papers_settings(name):
    hf_src, template, mode = RECIPES[name]
    tree = recipe_tree(name)
    moe = tree["moe"]
    assert (moe["num_experts"], moe["top_k"], moe["layers"], tree["router"]["type"]) == (4, 1, "even", "dtr")
    stages = tree["stages"]
    assert [s["name"] for s in stages] == ["projector", "warmup", "evolution", "router"]
    assert [s["moe_mode"] for s in stages] == ["dense", "dense", "evolve", "sparse"]
    assert stages[0]["trainable"] == ["projector.*"]
    assert [s.get("global_batch_size", tree["train"]["global_batch_size"]) for s in stages] == [256, 256, 64, 64]
    assert [s["steps"] for s in stages[1:]] == [5200, 10395, 10395]
    assert [s["lr"] for s in stages] == [1e-3, 2e-5, 2e-5, 2e-5]
    assert {s["schedule"] for s in stages} == {"cosine"}
    assert tree["train"]["weight_decay"] == 0.0 and tree["train"]["bf16"] is True
    assert tree["data"]["seq_len"] == 2048 == tree["model"]["max_seq_len"]
    # the converted checkpoint: the SLURM script's default folder, and its tokenizer
    ckpt = f"checkpoints/{name[len('evomoe_'):]}"
    assert tree["train"]["init_from"] == ckpt and tree["data"]["tokenizer"] == f"{ckpt}/tokenizer"
    assert f"--src {hf_src} " in (ROOT / "examples/configs" / f"{name}.yaml").read_text()
    assert stages[0]["conversation_template"] == "plain" and tree["data"]["conversation_template"] == template
    assert tree["vision"]["image_mode"] == mode
    assert (tree["vision"]["image_size"] // tree["vision"]["patch_size"]) ** 2 == 576


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_validates(name):
    """Needs the template, image-mode and GELU-expert fields of issue 12 in the config schema."""
    cfg = load_config(ROOT / "examples/configs" / f"{name}.yaml")
    assert cfg.moe.top_k == 1 and cfg.train.init_from.startswith("checkpoints/")


def _slurm_env(tmp_path, **extra):
    bindir = tmp_path / "bin"
    bindir.mkdir(parents=True, exist_ok=True)
    (bindir / "scontrol").write_text("#!/bin/sh\necho node1\n")
    (bindir / "scontrol").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE"))}
    env.update(PATH=f"{bindir}:{env['PATH']}", PYTHON=sys.executable, PYTHONPATH=str(ROOT), SLURM_JOB_NODELIST="node1",
               SLURM_JOB_NUM_NODES="1", SLURM_JOB_ID="77", RECIPE="tiny_cpu", **extra)
    return env


def _sbatch(env, *args):
    return subprocess.run(["bash", str(SBATCH), "--dry-run", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_slurm_script_converts_then_trains_from_the_conversion(tmp_path):
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)
    ckpt = tmp_path / "ckpt"
    env = _slurm_env(tmp_path, CKPT=str(ckpt), LLM_SRC="/models/llm", VISION_SRC="/models/clip")
    out = _sbatch(env, "--train.global_batch_size=256")  # tiny_cpu's micro-batch 32 x 8 GPUs
    assert out.returncode == 0, out.stderr
    assert (f"convert: {sys.executable} -m megatron_evomoe.convert hf-to-evomoe --src /models/llm "
            f"--vision-src /models/clip --max-seq-len 2048 --dst {ckpt}") in out.stdout
    cmd = next(line for line in out.stdout.splitlines() if line.startswith("command:"))
    assert f"--train.init_from={ckpt} --data.tokenizer={ckpt}/tokenizer --train.global_batch_size=256" in cmd
    assert not ckpt.exists()  # a dry run converts nothing


def test_slurm_script_needs_the_sources_only_without_a_conversion(tmp_path):
    ckpt = tmp_path / "ckpt"
    out = _sbatch(_slurm_env(tmp_path, CKPT=str(ckpt)), "--train.global_batch_size=256")
    assert out.returncode != 0 and "set LLM_SRC" in out.stderr
    (ckpt / "checkpoints").mkdir(parents=True)
    (ckpt / "checkpoints" / "latest").write_text("00-imported\n")
    out = _sbatch(_slurm_env(tmp_path / "again", CKPT=str(ckpt)), "--train.global_batch_size=256")
    assert out.returncode == 0, out.stderr
    assert "convert:" not in out.stdout and f"--train.init_from={ckpt}" in out.stdout
