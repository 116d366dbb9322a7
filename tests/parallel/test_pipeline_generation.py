"""Pipelined KV-cache decoding (parallel/pipeline_generation.py) gives exactly the tokens of one
process (fp32, gloo): greedy and seeded sampling, prompts of two lengths with images, at pp=2 (also
under NCCL's point-to-point rules, tests/parallel/nccl_emulation.py) and tp2 x pp2; and
`model_answers` under pp=2 writes the one-process answer files (the main rank only writes them).
The stage-end POPE at pp=2 is checked against one process in test_trainer_parallel.py."""
from __future__ import annotations

import json

import torch

from megatron_evomoe.generation import generate
from megatron_evomoe.parallel import ParallelState, parallelize
from megatron_evomoe.parallel.pipeline_generation import decode_step_for
from tests.parallel.common import IMAGE_TOKEN, NUM_IMAGE_TOKENS, VOCAB, build_model, tiny_cfg

from .dist_utils import run_distributed
from .nccl_emulation import nccl_p2p_semantics

MAX_NEW = 6
EOS = VOCAB - 2


def _prompts():
    """Five prompts with an image each: lengths 9 and 12 (two decoding batches)."""
    g = torch.Generator().manual_seed(3)
    prompts = []
    for length in (9, 12, 9, 12, 12):
        ids = torch.randint(0, VOCAB - 2, (length,), generator=g)
        ids[1:1 + NUM_IMAGE_TOKENS] = IMAGE_TOKEN
        prompts.append(ids)
    return prompts, torch.randn(len(prompts), 3, 16, 16, generator=g)


def _decode(model, step):
    prompts, images = _prompts()
    greedy = generate(model, prompts, images, MAX_NEW, EOS, step=step)
    sampled = generate(model, prompts, images, MAX_NEW, EOS, temperature=1.0,
                       generator=torch.Generator().manual_seed(7), step=step)
    return greedy, sampled


def _worker(rank, world, tp, pp, nccl_rules=False):
    """-> [decoded] (+ the same decoded under NCCL's P2P ordering rules, tests/parallel/nccl_emulation.py)."""
    cfg = tiny_cfg(tp=tp, pp=pp)
    state = ParallelState.build(cfg, rank, world)
    model = parallelize(build_model(cfg), state, cfg).eval()
    out = [_decode(model, decode_step_for(state))]
    if nccl_rules:
        with nccl_p2p_semantics(15.0):  # raises NcclOrderDeadlock where NCCL would hang
            out.append(_decode(model, decode_step_for(state)))
    return out


def _reference():
    return _decode(build_model(tiny_cfg()).eval(), None)


def _check(per_rank, ref):
    greedy, sampled = ref
    assert sum(map(len, greedy)) >= 10 and len({t for row in greedy for t in row}) >= 3  # real answers
    assert greedy != sampled
    for rank, runs in enumerate(per_rank):
        for got in runs:
            assert got == ref, f"rank {rank}: {got} vs one process {ref}"


def test_pp2_decoding_equals_one_process_also_under_nccl_p2p_rules():
    _check(run_distributed(_worker, 2, 1, 2, True), _reference())


def test_tp2_pp2_decoding_equals_one_process():
    _check(run_distributed(_worker, 4, 2, 2), _reference())


def _pope_questions(trained, tmp_path):
    """Six POPE questions about the bundled test images (16x16 PNGs), labels alternating."""
    lines = [json.dumps({"question_id": 100 + i, "image": f"test_{i % 4:05d}.png", "category": "random",
                         "text": f"Is there a {w} in the image?", "label": "yes" if i % 2 else "no"})
             for i, w in enumerate(["cat", "dog", "car", "tree", "cup", "bird"])]
    qfile = tmp_path / "pope.jsonl"
    qfile.write_text("\n".join(lines) + "\n")
    return ["--ckpt", str(trained["run"]), "--benchmark", "pope", "--data", str(qfile),
            "--images", str(trained["data"] / "images"), "--max-new-tokens", "4"]


def _answers_worker(rank, world, args):
    from megatron_evomoe.eval.model_answers import main
    return main(args)


def test_model_answers_pp2_writes_the_one_process_files(trained, tmp_path):
    from megatron_evomoe.eval.model_answers import main
    args = _pope_questions(trained, tmp_path)
    one, two = tmp_path / "one", tmp_path / "pp2"
    ref = main(args + ["--out", str(one)])
    per_rank = run_distributed(_answers_worker, 2, args + ["--out", str(two), "--pp", "2"])
    answers = (one / "pope_answers.jsonl").read_text()
    assert answers.count("\n") == 6 and all(json.loads(line)["text"] for line in answers.splitlines())
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert (two / "pope_answers.jsonl").read_text() == answers
    assert json.loads((two / "pope.json").read_text())["metrics"] == json.loads((one / "pope.json").read_text())["metrics"]
    assert per_rank[0]["metrics"] == ref["metrics"]
    assert per_rank[1]["responses"] == {str(q["question_id"]): q["answer"] for q in ref["questions"]}


def test_model_answers_pp_without_enough_processes_is_one_line(trained, tmp_path, capsys):
    from megatron_evomoe.eval.model_answers import main
    try:
        main(_pope_questions(trained, tmp_path) + ["--out", str(tmp_path / "o"), "--pp", "2"])
    except SystemExit as e:
        assert e.code == 2
    else:
        raise AssertionError("--pp 2 in one process must be refused")
    err = capsys.readouterr().err
    assert "--tp 1 x --pp 2 = 2 ranks per model does not divide the 1 process(es)" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
