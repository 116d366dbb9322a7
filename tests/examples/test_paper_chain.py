"""The paper's chain on tiny random stand-ins, as a user runs it with real checkpoints:

Hugging Face folders (a Qwen2-shaped decoder with its tokenizer, a CLIP vision tower) ->
`python -m megatron_evomoe.convert hf-to-evomoe` -> the four EvoMoE stages from that import
(`train.init_from`, the recipes' top-1 of 4 experts on alternate layers, the DTR) on the bundled data ->
POPE through `model_answers` and the saved-answers scorer, MME / TextVQA / MMBench on small files in their
release formats -> export -> transformers' AutoProcessor + LlavaForConditionalGeneration on the export.

The decoder is Qwen2-shaped (q/k/v biases, tied embeddings) as the smallest paper model; its tokenizer is
a word-level Hugging Face tokenizer over the bundled data's words, so the data means something to it. The
trained model has DTR routers, which no transformers class holds: its stage-II (evolution) checkpoint, whose
MoE layers still run their dense FFN1, is what exports as LLaVA (logits equal to ours), and the final model
exports in the project's own format, which imports back to the same logits.
"""
import json

import pytest
import torch

from megatron_evomoe import checkpointing as ckpt
from megatron_evomoe.config import load_config
from megatron_evomoe.convert import evomoe_to_hf
from megatron_evomoe.convert.__main__ import main as convert_main
from megatron_evomoe.eval import textvqa
from megatron_evomoe.eval.model_answers import main as answers_main
from megatron_evomoe.eval.model_answers import make_answer_fn
from megatron_evomoe.eval.runner import main as score_main
from megatron_evomoe.generate import image_processor_for, load_for_inference, prompt_ids, prompt_text
from megatron_evomoe.training.trainer import Trainer

hf = pytest.importorskip("transformers", reason="the chain starts from Hugging Face folders (pip install .[test])")

MAX_NEW = 4
LLM = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
           max_position_embeddings=128, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True)
CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=16,
            patch_size=8)
# What a recipe states for that import (the shapes hf-to-evomoe reports), with the paper's MoE and stages.
RECIPE = [
    "--model.hidden_size=32", "--model.num_layers=4", "--model.num_heads=4", "--model.num_kv_heads=2",
    "--model.ffn_hidden_size=48", "--model.max_seq_len=128", "--model.rope_theta=1e6", "--model.norm_eps=1e-6",
    "--model.qkv_bias=true", "--model.tie_embeddings=true",
    "--vision.image_size=16", "--vision.patch_size=8", "--vision.hidden_size=32", "--vision.num_layers=2",
    "--vision.num_heads=4", "--vision.ffn_hidden_size=64", "--vision.cls_token=true", "--vision.pre_norm=true",
    "--vision.final_norm=false", "--vision.activation=quick_gelu",
    "--moe.num_experts=4", "--moe.top_k=1", "--moe.layers=even", "--moe.renormalize=false",
    "--moe.expert_backend=torch", "--router.type=dtr", "--router.backend=torch",
    "--data.seq_len=96", "--data.conversation_template=vicuna_v1", "--data.num_eval_samples=8", "--data.build_if_missing=false",
    "--train.micro_batch_size=4", "--train.global_batch_size=8", "--train.log_interval=1",
    "--train.progress_bar=false", "--train.tensorboard=false", "--train.save_interval=0",
    "--train.keep_checkpoints=8",
    "--stages=[{name: projector, trainable: ['projector.*'], data: captions.json, conversation_template: plain, steps: 2,"
    " lr: 1.0e-3, eval: false},"
    " {name: warmup, trainable: ['llm.*', 'projector.*'], steps: 2, lr: 2.0e-5, eval: false},"
    " {name: evolution, trainable: ['llm.layers.{moe}.mlp.*'], global_batch_size: 4, steps: 2, lr: 2.0e-5,"
    " moe_mode: evolve, eval: false},"
    " {name: router, trainable: ['llm.layers.{moe}.mlp.router.*'], global_batch_size: 4, steps: 2, lr: 2.0e-5,"
    " moe_mode: sparse}]",
]


def hf_word_tokenizer(words, directory):
    """A Hugging Face tokenizer.json over `words` (the bundled vocabulary: <pad> <s> </s> <unk> <image> ...)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])  # as LLaMA's
    tok.add_special_tokens([AddedToken(w, special=True, normalized=False) for w in words[:5]])
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                                 "pad_token": "<pad>"}))


@torch.no_grad()
def random_weights(model, seed):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * 0.2 if p.dim() > 1 else p + 0.1 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def chain(data_root, tmp_path_factory):
    """HF folders -> import -> the four stages; returns the folders."""
    root = tmp_path_factory.mktemp("chain")
    words = json.loads((data_root / "tokenizer" / "vocab.json").read_text())["tokens"]
    llm = random_weights(hf.Qwen2ForCausalLM(hf.Qwen2Config(vocab_size=len(words) + 3, **LLM)), 1)
    llm.save_pretrained(root / "qwen2")
    hf_word_tokenizer(words, root / "qwen2")
    random_weights(hf.CLIPVisionModel(hf.CLIPVisionConfig(**CLIP)), 2).save_pretrained(root / "clip")
    imported = root / "checkpoints" / "qwen2_clip"
    assert convert_main(["hf-to-evomoe", "--src", str(root / "qwen2"), "--vision-src", str(root / "clip"),
                         "--max-seq-len", "128", "--dst", str(imported)]) == 0
    # the import's vocabulary (the model's rows), its tokenizer and weights, as the SLURM script passes them
    cfg = load_config(None, RECIPE + [
        f"--model.vocab_size={len(words) + 3}", f"--data.root={data_root}", f"--data.index_dir={root / 'index'}",
        f"--data.tokenizer={imported / 'tokenizer'}", f"--train.init_from={imported}",
        f"--train.save_dir={root / 'run'}"])
    history = Trainer(cfg).run()
    return dict(root=root, imported=imported, run=root / "run", data=data_root, history=history)


def test_training_starts_from_the_import_and_runs_four_stages(chain):
    stages = [h["stage"] for h in chain["history"] if "global_step" in h]
    assert stages == ["projector"] * 2 + ["warmup"] * 2 + ["evolution"] * 2 + ["router"] * 2
    assert [h["stage"] for h in chain["history"] if "eval" in h] == ["router"]  # the stage-end POPE
    imported = ckpt.load_checkpoint(ckpt.find_latest(chain["imported"]))
    first = ckpt.load_checkpoint(stage_checkpoint(chain["run"], "projector"))
    # stage 0 trains the projector only: every other tensor is the imported one
    for k, v in imported["model"].items():
        if not k.startswith("projector."):
            assert torch.equal(first["model"][k], v), k
    assert any(not torch.equal(first["model"][k], imported["model"][k]) for k in imported["model"]
               if k.startswith("projector."))
    saved = first["config"]["model"]
    assert {k: saved[k] for k in imported["config"]["model"]} == imported["config"]["model"]  # recipe = import


def stage_checkpoint(run, stage):
    found = [p for p in sorted((run / "checkpoints").iterdir()) if (p / "meta.json").is_file()
             and json.loads((p / "meta.json").read_text()).get("stage") == stage
             and json.loads((p / "meta.json").read_text()).get("stage_end")]
    assert len(found) == 1, (stage, found)
    return found[0]


# ------------------------------------------------------------------------------------------------ benchmarks

def pope_says_no(answer):
    """LLaVA's eval_pope: split on spaces; 'no' when a word is exactly No, not or no."""
    return any(w in ("No", "not", "no") for w in answer.split(" "))


def model_answers(chain, benchmark, data, out, *extra):
    args = ["--ckpt", str(chain["run"]), "--benchmark", benchmark, "--data", str(data), "--out", str(out),
            "--max-new-tokens", str(MAX_NEW), *extra]
    answers_main(args)
    return json.loads((out / f"{benchmark}.json").read_text())


def test_pope_through_model_answers_and_the_answers_scorer(chain, tmp_path):
    data, images = chain["data"] / "pope_test.jsonl", chain["data"] / "images"
    saved = model_answers(chain, "pope", data, tmp_path / "answers", "--images", str(images), "--limit", "8")
    recs = saved["questions"]
    labels = [json.loads(line)["label"] for line in data.read_text().splitlines()[:8]]
    right = [("no" if pope_says_no(r["answer"]) else "yes") == gt for r, gt in zip(recs, labels)]
    assert len(recs) == 8 and saved["metrics"]["accuracy"] == pytest.approx(sum(right) / 8)
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"question_id": r["question_id"], "answer": r["answer"]}) + "\n"
                               for r in recs))
    scored = score_main(["--benchmark", "pope", "--data", str(data), "--images", str(images), "--limit", "8",
                         "--answers-jsonl", str(answers), "--out-dir", str(tmp_path / "scored")])
    assert json.loads(json.dumps(scored["metrics"])) == saved["metrics"]


def mme_pred(answer):
    """MME's calculation.py: yes/no exactly, else yes/no within the first 4 characters, else other."""
    text = answer.strip().lower()
    if text in ("yes", "no"):
        return text
    return "yes" if "yes" in text[:4] else "no" if "no" in text[:4] else "other"


def test_mme_textvqa_mmbench_on_small_release_files(chain, tmp_path):
    from PIL import Image
    png = chain["data"] / "images" / "test_00000.png"
    mme = tmp_path / "mme" / "existence"
    mme.mkdir(parents=True)
    Image.open(png).save(mme / "0001.png")
    (mme / "0001.txt").write_text("Is there a red circle in the image?\tYes\n"
                                  "Is there a blue square in the image?\tNo\n")
    recs = model_answers(chain, "mme", tmp_path / "mme", tmp_path / "out")["questions"]
    right = [mme_pred(r["answer"]) == gt for r, gt in zip(recs, ("yes", "no"))]
    mme_scores = json.loads((tmp_path / "out" / "mme.json").read_text())["metrics"]["categories"]["existence"]
    assert len(recs) == 2 and mme_scores["score"] == pytest.approx(100 * sum(right) / 2 + 100 * all(right))

    # TextVQA: ten humans gave the model's own answer to q0 and a word it cannot say to q1 -> 1.0 and 0.0
    model, cfg, bundle, state = load_for_inference(chain["run"])
    own = make_answer_fn(model, cfg, bundle, max_new_tokens=MAX_NEW)
    images = tmp_path / "textvqa"
    images.mkdir()
    Image.open(png).convert("RGB").save(images / "img0.jpg")
    questions = ["What colour is the circle?", "What is written on the sign?"]
    doc = tmp_path / "textvqa_val.json"
    entries = [{"question_id": i, "question": q, "image_id": "img0"} for i, q in enumerate(questions)]
    doc.write_text(json.dumps({"data": entries}))
    q0 = textvqa.load_questions(str(doc), str(images))[0]
    first = own(q0.image_path, q0.prompt)  # the prompts do not depend on the answers
    entries[0]["answers"], entries[1]["answers"] = [first] * 10, ["xylophone"] * 10
    doc.write_text(json.dumps({"data": entries}))
    saved = model_answers(chain, "textvqa", doc, tmp_path / "out", "--images", str(images))
    assert saved["questions"][0]["answer"] == first and saved["metrics"]["accuracy"] == pytest.approx(0.5)

    # MMBench, circular: two options -> two passes, right only if both are
    import base64
    tsv = tmp_path / "mmbench_dev.tsv"
    row = ["0", "What colour is the circle?", "", "red", "blue", "A", "color", "attribute",
           base64.b64encode(png.read_bytes()).decode()]
    tsv.write_text("index\tquestion\thint\tA\tB\tanswer\tcategory\tl2-category\timage\n" + "\t".join(row) + "\n")
    saved = model_answers(chain, "mmbench", tsv, tmp_path / "out", "--images", str(tmp_path / "mmb"))
    passes = saved["questions"]
    assert len(passes) == 2
    assert saved["metrics"]["accuracy"] == float(all(r["pred"] == r["gt"] for r in passes))


# ------------------------------------------------------------------------------------------------ export

QUESTION = "Is there a red circle in the image?"


def our_inputs(folder, image):
    model, cfg, bundle, state = load_for_inference(folder)
    ids = prompt_ids(QUESTION, bundle.tokenizer, cfg, has_image=True, stage_idx=state["stage_idx"])
    text = prompt_text(QUESTION, bundle.tokenizer, cfg, has_image=True, stage_idx=state["stage_idx"])
    return model, torch.tensor([ids]), text, image_processor_for(cfg)(image)[None]


def test_evolution_checkpoint_exports_as_llava_with_our_logits(chain, tmp_path):
    from PIL import Image
    image = Image.open(chain["data"] / "images" / "test_00001.png")
    evolved = stage_checkpoint(chain["run"], "evolution")  # MoE layers still run FFN1: exactly a dense model
    evomoe_to_hf(evolved, tmp_path / "hf", echo=lambda s: None)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "llava"
    model, ids, text, pixels = our_inputs(evolved, image)
    processor = hf.AutoProcessor.from_pretrained(tmp_path / "hf")
    inputs = processor(images=image, text=text, return_tensors="pt")
    assert torch.equal(inputs["input_ids"], ids)  # <image> expanded to the tower's 4 tokens, BOS in front
    assert float((inputs["pixel_values"] - pixels).abs().max()) < 1e-5
    back = hf.LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        ours, theirs = model(ids, pixels).logits, back(**inputs).logits
    assert float((ours - theirs).abs().max()) < 5e-5


def test_final_model_roundtrips_through_the_own_format(chain, tmp_path):
    from PIL import Image
    image = Image.open(chain["data"] / "images" / "test_00001.png")
    evomoe_to_hf(chain["run"], tmp_path / "own", echo=lambda s: None)  # DTR routers: no transformers class
    assert json.loads((tmp_path / "own" / "config.json").read_text())["model_type"] == "evomoe"
    assert convert_main(["hf-to-evomoe", "--src", str(tmp_path / "own"), "--dst", str(tmp_path / "again")]) == 0
    model, ids, _, pixels = our_inputs(chain["run"], image)
    again, ids2, _, pixels2 = our_inputs(tmp_path / "again", image)
    assert torch.equal(ids, ids2) and torch.equal(pixels, pixels2)
    with torch.no_grad():
        assert torch.equal(model(ids, pixels).logits, again(ids2, pixels2).logits)
