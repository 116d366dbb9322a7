"""Runs pretrain_evomoe.main with one injected fault (test-only; the product has no fault hooks).

    python fault_launcher.py MODE N -- <pretrain_evomoe args>
    torchrun --nproc-per-node 2 fault_launcher.py MODE N -- <args>      # every rank runs it

MODE (when): step     -> inside the N-th optimizer step (after backward, before optimizer.step)
             save     -> half-way through writing (this rank's part of) the N-th checkpoint
             evolve   -> inside the N-th evolution update, after some evolved tensors changed
             stage    -> right after the N-th stage-end checkpoint is complete
             eval     -> inside the N-th stage-end evaluation

Environment (what, and where):
  EVOMOE_FAULT_ACTION  kill (default: SIGKILL itself) | exit (os._exit(1), no clean-up) |
                       hang (sleep forever, heartbeat thread still alive) |
                       term / int / usr1 (send itself SIGTERM / SIGINT / SIGUSR1 and carry on: the
                       trainer stops at the next step boundary with a checkpoint)
  EVOMOE_FAULT_RANK    only this rank (torchrun's RANK) has the fault; default: every rank
  EVOMOE_FAULT_ONCE    a marker file: the fault fires only if it does not exist yet, and creates it
                       (so that the run torchrun restarts after the fault runs clean); it holds
                       the wall time of the fault (the tests measure how fast the others react)
"""
import os
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


SIGNALS = {"term": signal.SIGTERM, "int": signal.SIGINT, "usr1": signal.SIGUSR1}


def fire() -> None:
    action = os.environ.get("EVOMOE_FAULT_ACTION", "kill")
    once = os.environ.get("EVOMOE_FAULT_ONCE")
    if once:
        Path(once).write_text(f"{time.time():.3f} {action} in pid {os.getpid()}, rank {os.environ.get('RANK', '0')}\n")
    print(f"fault_launcher: {action} on rank {os.environ.get('RANK', '0')}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "exit":
        os._exit(1)
    elif action == "hang":
        while True:
            time.sleep(3600)
    elif action in SIGNALS:
        os.kill(os.getpid(), SIGNALS[action])
        return
    raise SystemExit(f"unknown EVOMOE_FAULT_ACTION {action}")


def counter(n):
    state = {"calls": 0}

    def hit():
        state["calls"] += 1
        return state["calls"] == n
    return hit


def armed() -> bool:
    rank = os.environ.get("EVOMOE_FAULT_RANK")
    if rank is not None and rank != os.environ.get("RANK", "0"):
        return False
    once = os.environ.get("EVOMOE_FAULT_ONCE")
    return not (once and Path(once).exists())


def install(mode: str, n: int) -> None:
    import torch

    from megatron_evomoe.moe import evolution
    from megatron_evomoe.training import trainer as trainer_mod

    hit = counter(n)
    if mode == "step":
        real = torch.optim.AdamW.step

        def step(self, *a, **k):
            if hit():
                fire()
            return real(self, *a, **k)
        torch.optim.AdamW.step = step
    elif mode == "save":
        # the N-th checkpoint (state.pt of one process; a rank's part of a distributed one) dies at its
        # first write into a file: after DCP's planning, with the other ranks writing theirs
        from megatron_evomoe import checkpointing
        from megatron_evomoe.parallel import distributed_checkpoint as dcp_mod
        real_save, now = torch.save, {"armed": False}

        def counted(real):
            def wrapper(*a, **k):
                now["armed"] = hit()
                return real(*a, **k)
            return wrapper
        checkpointing.save_checkpoint = counted(checkpointing.save_checkpoint)
        dcp_mod.DistributedCheckpointer._save = counted(dcp_mod.DistributedCheckpointer._save)

        def save(obj, f, *a, **k):
            if now["armed"] and hasattr(f, "fileno"):
                now["armed"] = False
                if os.environ.get("EVOMOE_FAULT_ACTION", "kill") not in SIGNALS:  # dies half-way through
                    f.write(b"\x80\x02partial checkpoint bytes")
                    f.flush()
                fire()
            return real_save(obj, f, *a, **k)
        torch.save = save
    elif mode == "evolve":
        real_evolve = evolution.evolve_
        calls = {"n": 0}

        def evolve_(*a, **k):
            real_evolve(*a, **k)
            calls["n"] += 1
            if calls["n"] == 3 * n - 1:  # 3 weights per module: die between two of them
                fire()
        evolution.evolve_ = evolve_
    elif mode == "stage":
        real_save_ckpt = trainer_mod.Trainer._save

        def _save(self, idx, step, opt, data, evo, stage_end):
            real_save_ckpt(self, idx, step, opt, data, evo, stage_end)
            if stage_end and hit():
                fire()
        trainer_mod.Trainer._save = _save
    elif mode == "eval":
        real_eval = trainer_mod.evaluate_pope

        def evaluate_pope(*a, **k):
            if hit():
                fire()
            return real_eval(*a, **k)
        trainer_mod.evaluate_pope = evaluate_pope
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    mode, n, sep, *args = sys.argv[1:]
    assert sep == "--"
    if armed():
        install(mode, int(n))
    import pretrain_evomoe
    sys.exit(pretrain_evomoe.main(args))
