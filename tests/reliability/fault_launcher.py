"""Runs pretrain_evomoe.main with one injected SIGKILL (test-only; the product has no fault hooks).

    python fault_launcher.py MODE N -- <pretrain_evomoe args>

MODE: step     -> killed inside the N-th optimizer step (after backward, before optimizer.step)
      save     -> killed half-way through writing the N-th checkpoint file
      evolve   -> killed inside the N-th evolution update, after some evolved tensors changed
      stage    -> killed right after the N-th stage-end checkpoint is complete
"""
import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def die():
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def counter(n):
    state = {"calls": 0}

    def hit():
        state["calls"] += 1
        return state["calls"] == n
    return hit


def install(mode: str, n: int) -> None:
    import torch

    from megatron_evomoe.moe import evolution
    from megatron_evomoe.training import trainer as trainer_mod

    hit = counter(n)
    if mode == "step":
        real = torch.optim.AdamW.step

        def step(self, *a, **k):
            if hit():
                die()
            return real(self, *a, **k)
        torch.optim.AdamW.step = step
    elif mode == "save":
        real_save = torch.save

        def save(obj, f, *a, **k):
            if hit():
                f.write(b"\x80\x02partial checkpoint bytes")
                f.flush()
                die()
            return real_save(obj, f, *a, **k)
        torch.save = save
    elif mode == "evolve":
        real_evolve = evolution.evolve_
        calls = {"n": 0}

        def evolve_(*a, **k):
            real_evolve(*a, **k)
            calls["n"] += 1
            if calls["n"] == 3 * n - 1:  # 3 weights per module: die between two of them
                die()
        evolution.evolve_ = evolve_
    elif mode == "stage":
        real_save_ckpt = trainer_mod.Trainer._save

        def _save(self, idx, step, opt, data, evo, stage_end):
            real_save_ckpt(self, idx, step, opt, data, evo, stage_end)
            if stage_end and hit():
                die()
        trainer_mod.Trainer._save = _save
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    mode, n, sep, *args = sys.argv[1:]
    assert sep == "--"
    install(mode, int(n))
    import pretrain_evomoe
    sys.exit(pretrain_evomoe.main(args))
