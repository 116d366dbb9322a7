"""End-to-end staged training on a tiny model: freezing, evolution, resume, atomic saves."""
import json

import pytest
import torch

from megatron_evomoe.moe.evolution import EvolvingFFN
from megatron_evomoe.moe.moe_layer import MoELayer
from megatron_evomoe import checkpointing as ckpt
from megatron_evomoe.config import ConfigError
from megatron_evomoe.stages.structure import apply_stage_structure
from megatron_evomoe.training.trainer import Trainer


def losses(history):
    return [(h["stage"], h["stage_step"], h["loss"]) for h in history if "loss" in h]


def test_stages_freeze_exactly_what_they_say(make_cfg, monkeypatch):
    trainer = Trainer(make_cfg())
    snapshots = {}
    real = Trainer._run_stage

    def spy(self, idx, stage, resume):
        apply_stage_structure(self.model, self.cfg, stage, self.structure_gen)  # idempotent: real() won't redo it
        before = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        real(self, idx, stage, resume)
        after = dict(self.model.named_parameters())
        snapshots[stage.name] = {n for n in before if n in after and not torch.equal(before[n], after[n])}

    monkeypatch.setattr(Trainer, "_run_stage", spy)
    trainer.run()
    assert snapshots["projector"] and all(n.startswith("projector.") for n in snapshots["projector"])
    assert all(n.startswith("llm.layers.1.mlp.") for n in snapshots["evolution"])
    assert snapshots["evolution"] == {"llm.layers.1.mlp.w_gate.weight", "llm.layers.1.mlp.w_up.weight",
                                      "llm.layers.1.mlp.w_down.weight"}
    assert snapshots["router"] and all(n.startswith("llm.layers.1.mlp.router.") for n in snapshots["router"])
    layer = trainer.model.llm.layers[1].mlp
    assert isinstance(layer, MoELayer) and layer.experts.num_experts == 4


def test_split_uses_the_evolved_experts(make_cfg, monkeypatch):
    trainer = Trainer(make_cfg())
    seen = {}
    real = Trainer._run_stage

    def spy(self, idx, stage, resume):
        if stage.name == "router":
            ffn = self.model.llm.layers[1].mlp
            assert isinstance(ffn, EvolvingFFN)
            seen["experts"] = [{k: v.clone() for k, v in e.items()} for e in ffn.expert_weights()]
        real(self, idx, stage, resume)

    monkeypatch.setattr(Trainer, "_run_stage", spy)
    trainer.run()
    ex = trainer.model.llm.layers[1].mlp.experts  # frozen in the router stage, so unchanged
    for e, w in enumerate(seen["experts"]):
        torch.testing.assert_close(ex.w_down[e], w["w_down"].t(), rtol=0, atol=0)
    # evolved experts really moved away from FFN1 and from each other
    assert not torch.equal(ex.w_gate[0], ex.w_gate[1]) and not torch.equal(ex.w_gate[1], ex.w_gate[2])


class Crash(Exception):
    pass


@pytest.mark.parametrize("crash_at", [6, 7])  # inside the evolution stage (global steps 6..8)
def test_resume_continues_the_same_trajectory(make_cfg, tmp_path, monkeypatch, crash_at):
    full = Trainer(make_cfg(save_dir=tmp_path / "full")).run()

    real = Trainer._train_step

    def crashing(self, *a, **k):
        if self.global_step + 1 == crash_at:
            raise Crash()
        return real(self, *a, **k)

    monkeypatch.setattr(Trainer, "_train_step", crashing)
    with pytest.raises(Crash):
        Trainer(make_cfg(save_dir=tmp_path / "resumed")).run()
    monkeypatch.setattr(Trainer, "_train_step", real)
    resumed_trainer = Trainer(make_cfg(save_dir=tmp_path / "resumed"))
    resumed = resumed_trainer.run()
    # the last checkpoint before the crash is at global step 5 (end of warm-up) or 6 (save_interval=2)
    tail = losses(resumed)
    assert len(tail) >= 2 + 3  # at least 2 steps after the resume point, plus the router stage
    full_by_key = {(s, i): l for s, i, l in losses(full)}
    for s, i, l in tail:
        assert l == full_by_key[(s, i)], (s, i)  # bitwise: deterministic CPU run
    full_model = Trainer(make_cfg(save_dir=tmp_path / "full"))  # loads the final checkpoint's weights
    state_a = ckpt.load_checkpoint(ckpt.find_latest(tmp_path / "full"))["model"]
    state_b = ckpt.load_checkpoint(ckpt.find_latest(tmp_path / "resumed"))["model"]
    assert state_a.keys() == state_b.keys()
    for k in state_a:
        assert torch.equal(state_a[k], state_b[k]), k
    del full_model


def test_killed_save_leaves_previous_checkpoint_loadable(make_cfg, tmp_path, monkeypatch):
    cfg = make_cfg(save_dir=tmp_path / "run")
    trainer = Trainer(cfg)
    real_save = torch.save
    calls = {"n": 0}

    def dying_save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint dies half-way through writing
            f.write(b"partial")
            raise KeyboardInterrupt("killed mid-write")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    monkeypatch.setattr(torch, "save", real_save)
    latest = ckpt.find_latest(tmp_path / "run")
    meta = json.loads((latest / "meta.json").read_text())
    assert meta["global_step"] == 2 and meta["complete"] is True
    state = ckpt.load_checkpoint(latest)
    assert state["global_step"] == 2
    # the half-written folder is never taken for a checkpoint, and the run resumes from step 2
    resumed = Trainer(make_cfg(save_dir=tmp_path / "run"))
    history = resumed.run()
    assert losses(history)[0][:2] == ("warmup", 1)


def test_save_error_is_reported_and_previous_checkpoint_survives(make_cfg, tmp_path, monkeypatch):
    trainer = Trainer(make_cfg(save_dir=tmp_path / "run"))
    real_save = torch.save
    calls = {"n": 0}

    def full_disk(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(ckpt.CheckpointError, match="No space left on device"):
        trainer.run()
    assert json.loads((ckpt.find_latest(tmp_path / "run") / "meta.json").read_text())["global_step"] == 2
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))


def test_nonfinite_policies(make_cfg, monkeypatch):
    from megatron_evomoe.training.nonfinite import NonFiniteError
    cfg = make_cfg("--train.nonfinite=stop", "--stages.projector.steps=3")
    trainer = Trainer(cfg)
    with torch.no_grad():
        trainer.model.projector[0].weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"stage 'projector' step 1"):
        trainer.run()
    cfg = make_cfg("--train.nonfinite=skip", "--stages=[{name: p, trainable: ['projector.*'], "
                   "data: captions.json, steps: 2, eval: false}]")
    trainer = Trainer(cfg)
    with torch.no_grad():
        trainer.model.projector[0].weight[0, 0] = float("nan")
    before = trainer.model.projector[2].weight.detach().clone()
    history = trainer.run()
    assert all(h.get("skipped") for h in history if "loss" in h)
    assert torch.equal(before, trainer.model.projector[2].weight)


def test_nonfinite_reduce_lr_halves_the_lr_after_a_bad_step(make_cfg):
    cfg = make_cfg("--train.nonfinite=reduce_lr", "--stages=[{name: p, trainable: ['projector.*'], "
                   "data: captions.json, steps: 3, eval: false, schedule: constant, lr: 0.01}]")
    trainer = Trainer(cfg)
    calls = {"n": 0}

    def nan_in_second_step(module, args, out):
        calls["n"] += 1
        return out * float("nan") if calls["n"] == 2 else out

    trainer.model.projector.register_forward_hook(nan_in_second_step)
    history = [h for h in trainer.run() if "loss" in h]
    assert [bool(h.get("skipped")) for h in history] == [False, True, False]
    assert [h["lr"] for h in history] == [0.01, 0.01, 0.005]


def test_gradient_accumulation_equals_one_big_batch(make_cfg, tmp_path):
    one_stage = ("--stages=[{name: w, trainable: ['llm.*', 'projector.*'], steps: 2, eval: false, "
                 "schedule: constant}]")
    big = Trainer(make_cfg(one_stage, "--train.micro_batch_size=8", "--train.global_batch_size=8",
                           save_dir=tmp_path / "a")).run()
    acc = Trainer(make_cfg(one_stage, "--train.micro_batch_size=4", "--train.global_batch_size=8",
                           save_dir=tmp_path / "b")).run()
    for a, b in zip(big, acc):
        assert abs(a["loss"] - b["loss"]) < 1e-5 * abs(a["loss"]) and abs(a["grad_norm"] - b["grad_norm"]) < 1e-4


def test_bf16_autocast_trains(make_cfg):
    history = Trainer(make_cfg("--train.bf16=true", "--stages=[{name: w, trainable: ['llm.*'], steps: 2, "
                               "eval: false}]")).run()
    assert len(history) == 2 and all(0 < h["loss"] < 20 for h in history)


def test_init_from_loads_pretrained_weights_and_checks_shapes(make_cfg, tmp_path):
    one = "--stages=[{name: w, trainable: ['llm.*'], steps: 1, eval: false}]"
    Trainer(make_cfg(one, save_dir=tmp_path / "pre")).run()
    pre = ckpt.load_checkpoint(ckpt.find_latest(tmp_path / "pre"))["model"]
    t = Trainer(make_cfg(one, f"--train.init_from={tmp_path / 'pre'}", "--stages.w.lr=0.0",
                         save_dir=tmp_path / "b"))
    t.run()
    assert torch.equal(t.model.llm.embed.weight, pre["llm.embed.weight"])  # lr 0: weights as loaded
    bad = Trainer(make_cfg(one, f"--train.init_from={tmp_path / 'pre'}", "--model.ffn_hidden_size=64",
                           save_dir=tmp_path / "c"))
    with pytest.raises(ckpt.CheckpointError, match=r"train.init_from: .*\(shape of llm.layers.0.mlp.w_gate.weight"):
        bad.run()
    # a checkpoint imported with an HF image processor (meta.json names it) keeps its image settings
    meta_path = ckpt.find_latest(tmp_path / "pre") / "meta.json"
    meta_path.write_text(json.dumps(dict(json.loads(meta_path.read_text()), image_processor_source="clip/p.json")))
    other = Trainer(make_cfg(one, f"--train.init_from={tmp_path / 'pre'}", "--vision.image_mode=resize",
                             save_dir=tmp_path / "d"))
    with pytest.raises(ConfigError, match=r"^vision.image_mode: 'resize' contradicts the 'crop' processor .*clip/p"):
        other.run()
