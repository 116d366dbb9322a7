"""What the trainer calls for everything that depends on the layout (training/trainer.py).

One `ParallelTraining` exists for every run: a one-process run has a `ParallelState` of size 1,
whose groups are trivial, so every collective below is a no-op and the trainer has no second path.

    par = ParallelTraining(model, state, cfg)        # parallelizes the model (no-op for one process);
    par.materialise(device, seed)                    # a meta-built model: this rank's shards get values
    par.apply_stage_structure(stage, gen)            # dense -> evolve -> sparse on the sharded model
    par.set_trainable(stage, idx)                    # pattern check over all pipeline stages
    zero = par.start_stage(params, lr, wd, betas)    # the stage's gradient reducer, or (parallel.zero1)
                                                     # its ZeRO-1 optimizer, used instead of AdamW
    par.final_backward()                             # before the last micro-batch's backward: the DP
                                                     # buckets all-reduce during it (overlap)
    lm, aux = par.forward_backward(micro, n, ...)    # pipeline only (pp > 1): 1F1B
    norm = par.reduce_and_clip(params, max_norm)     # DP/expert-DP all-reduce (ZeRO-1: reduce-scatter),
                                                     # global norm, clip
    lm, aux = par.sum_losses(lm, aux)                # the global step's losses, for the record
Checkpoints (`checkpoint_write`, `load_state`): one process writes `state.pt`; a parallel job writes
one distributed checkpoint (distributed_checkpoint.py: each tensor once, by full-tensor boxes), which
any layout or one process loads. A one-process (or consolidated) `state.pt` loads into any layout too.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from .. import checkpointing as ckpt
from ..stages.structure import build_model
from ..stages.trainable import set_trainable
from .data_parallel import ZeroAdamW, all_reduce_floats, clip_grad_norm_
from .apply_layout import apply_dp, parallelize
from .pipeline import forward_backward_1f1b
from .checkpoint_boxes import (fresh_entry, install_entries, live_entries, model_boxes, optimizer_boxes,
                               optimizer_slots, staged_copy)
from ..dcp_reading import saved_model_shapes
from .distributed_checkpoint import DistributedCheckpointer
from .expert_bias import update_expert_biases
from .reshard import layout_name, shard_state_for
from .sharded_construction import materialise_shards
from .sharded_state import load_full_state_dict
from .stage_structure import apply_stage_structure
from .state import ParallelState, comm_device

log = logging.getLogger("megatron_evomoe")

# the layout a checkpoint without parallel metadata was saved in: one process, or consolidated
CONSOLIDATED_LAYOUT = "tp1-pp1-ep1-dp1"


class ParallelTraining:
    def __init__(self, model, state: ParallelState, cfg, bucket_size_mb: float | None = None):
        self.model, self.state, self.cfg = model, state, cfg
        self.bucket_size_mb = cfg.parallel.bucket_mb if bucket_size_mb is None else bucket_size_mb
        self.reducer = None
        self.zero_optimizer: ZeroAdamW | None = None
        self.param_names: list[str] = []
        parallelize(model, state, cfg)
        self.checkpointer = DistributedCheckpointer(state.rank, state.world_size, cfg.parallel.timeout_s)

    @property
    def pipeline(self) -> bool:
        return self.state.pp_size > 1

    @property
    def zero1(self) -> bool:
        """ZeRO-1 in use: `parallel.zero1` and a replica group to shard the optimizer state over
        (with dp == 1 the option is a no-op: the plain optimizer runs; expert-DP <= DP)."""
        return bool(self.cfg.parallel.zero1) and self.state.dp_size > 1

    @property
    def is_main(self) -> bool:
        """The rank that writes logs and metrics (global rank 0; under PP its stage has no
        loss, but `sum_losses` gives every rank the full values)."""
        return self.state.rank == 0

    @property
    def can_save_alone(self) -> bool:
        """Whether this rank may checkpoint while the others are elsewhere (a sample failed to load
        on this rank only): only when it is the whole job; the others are blocked in a collective."""
        return self.state.world_size == 1

    # ------------------------------------------------------------------ checkpoints
    @property
    def layout(self) -> str:
        return layout_name(self.state)

    def checkpoint_write(self, save_dir, name: str, plain: dict, opt, meta: dict, keep: int,
                         staged: bool) -> Callable[[], Path]:
        """The save of checkpoint `name`, to run now or in the background (staged: on copies taken
        here, at the step boundary, so training may go on changing the live tensors)."""
        meta = {**meta, "layout": self.layout}
        if self.state.world_size == 1:
            state = {"model": self.model.state_dict(), "optimizer": opt.state_dict(), **plain}
            if staged:
                state = staged_copy(state)
            return lambda: ckpt.save_checkpoint(save_dir, name, state, meta, keep)
        params = self._trainable()
        inner, slots = optimizer_slots(opt, params)
        boxes = {**model_boxes(self.model, self.state),
                 **optimizer_boxes(self.model, slots, live_entries(inner, slots), self.state)}
        if staged:
            boxes, plain = {k: b.staged() for k, b in boxes.items()}, staged_copy(plain)
        return lambda: self.checkpointer.save(save_dir, name, boxes, plain, meta, keep, watched=not staged)

    def _trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        named = dict(self.model.named_parameters())
        return [(n, named[n]) for n in self.param_names]

    def newest_common_checkpoint(self, ckpt_dir) -> Path | None:
        """This rank's newest checkpoint that every rank also completed. A rank killed while saving
        leaves the others one checkpoint ahead; they still hold the previous one (with
        train.keep_checkpoints >= 2), which the killed rank finished before."""
        latest = ckpt.find_latest(ckpt_dir)
        newest = -1 if latest is None else checkpoint_step(latest)
        common = self._min_over_ranks(newest)
        if common == newest:
            return latest
        log.warning("rank %d: the checkpoint of global step %d is not complete on every rank (a rank stopped "
                    "before finishing it); resuming from global step %d", self.state.rank, newest, common)
        mine = {checkpoint_step(p): p for p in ckpt.list_checkpoints(ckpt_dir)}
        return mine.get(common)  # None: no common step (agree_on_step names a rank that lacks it)

    def any_rank(self, flags: list[bool]) -> list[bool]:
        """Each flag true on any rank of the job (one MAX all-reduce; nothing to do for one process):
        how all ranks agree to stop at the same step boundary."""
        if self.state.world_size == 1:
            return list(flags)
        t = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.cpu().tolist()]

    def _min_over_ranks(self, value: int) -> int:
        if self.state.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.cpu()[0])

    def agree_on_step(self, global_step: int) -> None:
        """Resuming: every rank must have found the checkpoint of the same step."""
        if self.state.world_size == 1:
            return
        t = torch.tensor([global_step, -global_step], dtype=torch.int64, device=comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        t = t.cpu()
        if int(t[0]) != -int(t[1]):
            raise ckpt.CheckpointError(f"ranks found checkpoints of different steps (from {-int(t[1])} to "
                                       f"{int(t[0])}); delete the newer per-rank checkpoints or restore the missing "
                                       "ones")

    def materialise(self, device, seed: int) -> None:
        """Storage and initial values for this rank's shards of a model built on the meta device
        (sharded_construction.py): the values the one-process model holds there."""
        materialise_shards(self.model, self.state, self.cfg, device, seed)

    def load_full_weights(self, loaded: dict, source: str) -> None:
        """Pretrained single-process weights (train.init_from): every rank copies only its own
        slices out of `loaded["model"]` (memory-mapped or lazy tensors: the rest is never read)."""
        # against the one-process model's shapes (built on the meta device: no memory), in every layout:
        # names the first tensor and the config fields that differ
        with torch.device("meta"):
            full = build_model(self.cfg, self.model.image_token_id).state_dict()
        ckpt.check_model_fits(full, loaded, source, self.cfg.to_dict(),
                              "the model/vision sections must describe the same architecture")
        load_full_state_dict(self.model, loaded["model"], self.state)

    def load_state(self, ckpt_state: dict, opt, load_optimizer: bool, where: str = "resume") -> None:
        """Restore model (and optimizer): from a distributed checkpoint, each rank reads its own boxes
        (any saved layout); a `state.pt` (one process, or consolidated) is resharded to this layout."""
        if "dcp_folder" in ckpt_state:
            return self._load_distributed(ckpt_state, opt, load_optimizer, where)
        saved = ckpt_state.get("parallel", {})
        own = saved.get("layout", CONSOLIDATED_LAYOUT) == layout_name(self.state)
        saved_zero1 = bool(saved.get("zero1", False))
        # ZeRO-1 moments are per-replica ranges of the flattened parameters, not per-tensor: they
        # load only into the same layout with the same setting (a stage-end checkpoint, whose
        # optimizer is not loaded, works either way)
        if load_optimizer and (saved_zero1 != self.zero1 if own else self.zero1):
            raise ckpt.CheckpointError(
                f"parallel.zero1: cannot resume mid-stage from a checkpoint saved with zero1={saved_zero1} "
                f"{'in this layout' if own else '(consolidated or another layout)'} with zero1={self.zero1}; "
                "resume with the setting and layout it was saved with, or from a stage-end checkpoint")
        if own:
            ckpt.check_model_fits(self.model.state_dict(), ckpt_state, where, self.cfg.to_dict(),
                                  "use a new train.save_dir (or train.resume=false) for another architecture")
            model_sd, opt_sd = ckpt_state["model"], ckpt_state["optimizer"]
        else:
            model_sd, opt_sd = shard_state_for(self.model, self.state, ckpt_state, self.param_names)
        self.model.load_state_dict(model_sd)
        if not (load_optimizer and self.param_names):  # (a stage holding no trainable tensor has nothing to load)
            return
        try:
            opt.load_state_dict(opt_sd)
        except ValueError as e:  # same shapes, other trainable set
            stage = self.cfg.stages[ckpt_state["stage_idx"]].name
            raise ckpt.CheckpointError(f"{where}: its optimizer state does not fit this stage's trainable "
                                       f"parameters ({e}); was stages.{stage}.trainable changed?") from None

    def _load_distributed(self, ckpt_state: dict, opt, load_optimizer: bool, where: str) -> None:
        folder = ckpt_state["dcp_folder"]
        # against the one-process model of the checkpoint's stage (meta: no memory), in every layout
        # (a pipeline stage alone would see the other stages' tensors as unexpected)
        with torch.device("meta"):
            full = build_model(self.cfg, self.model.image_token_id, up_to_stage=ckpt_state["stage_idx"]).state_dict()
        ckpt.check_model_fits(full, {"model": saved_model_shapes(folder), "config": ckpt_state.get("config")},
                              where, self.cfg.to_dict(),
                              "use a new train.save_dir (or train.resume=false) for another architecture")
        boxes = model_boxes(self.model, self.state)
        load_optimizer = load_optimizer and bool(self.param_names)
        if load_optimizer:  # zeros in this layout's shape (ZeRO-1 or not), filled from the saved moments
            inner, slots = optimizer_slots(opt, self._trainable())
            entries = {s.name: fresh_entry(s) for s in slots}
            boxes.update(optimizer_boxes(self.model, slots, entries, self.state))
        self.checkpointer.load(folder, boxes, where)
        if load_optimizer:
            install_entries(opt, inner, slots, entries)

    # ------------------------------------------------------------------ stages
    def apply_stage_structure(self, stage, generator) -> None:
        self.wait_for_params()  # the structure change reads the parameters
        apply_stage_structure(self.model, self.cfg, stage, generator, self.state)

    def set_trainable(self, stage, stage_idx: int) -> list[str]:
        """`stages.trainable.set_trainable`; under PP a pattern only has to match on *some* stage."""
        return set_trainable(self.model, self.cfg, stage, stage_idx,
                             agree=self._max_over_pipeline if self.state.pp_group is not None else None)

    def _max_over_pipeline(self, used: torch.Tensor) -> torch.Tensor:
        used = used.to(comm_device(self.state.pp_group))
        dist.all_reduce(used, op=dist.ReduceOp.MAX, group=self.state.pp_group)
        return used.cpu()

    def start_stage(self, params, lr: float, weight_decay: float, betas: tuple[float, float]) -> ZeroAdamW | None:
        """The stage's gradient reducer; with ZeRO-1 the stage's sharded optimizer instead, returned
        for the trainer to use in place of AdamW (None: the trainer builds its usual optimizer)."""
        self.param_names = [n for n, _ in params]
        for previous in (self.reducer, self.zero_optimizer):  # its hooks would stay on the parameters
            if previous is not None:
                previous.remove_hooks()
        self.reducer = self.zero_optimizer = None
        if self.zero1:
            self.zero_optimizer = ZeroAdamW(self.model, params, self.state, lr=lr, betas=betas,
                                            weight_decay=weight_decay)
        else:
            self.reducer = apply_dp(self.model, params, self.state, self.bucket_size_mb)
        return self.zero_optimizer

    # ------------------------------------------------------------------ steps
    def forward_backward(self, micro, num_tokens: int, device, bf16: bool) -> tuple[float, float]:
        out = forward_backward_1f1b(self.model, self.state, micro, num_tokens, device,
                                    autocast_dtype=torch.bfloat16 if bf16 else None,
                                    before_last_backward=self.final_backward)
        return out["lm_loss"], out["aux_loss"]

    def wait_for_params(self) -> None:
        """Every parameter holds its value after the optimizer step (ZeRO-1's all-gather is asynchronous;
        the model's forward and state_dict wait by themselves, any other reader calls this)."""
        if self.zero_optimizer is not None:
            self.zero_optimizer.wait_params()

    def final_backward(self) -> None:
        """The next backward is the step's last: the DP buckets start reducing during it."""
        if self.reducer is not None:
            self.reducer.final_backward()

    def reduce_and_clip(self, params, max_norm: float) -> float:
        if self.zero_optimizer is not None:  # each replica gets the summed gradient of its range only
            self.zero_optimizer.reduce_gradients()
            return self.zero_optimizer.clip_grad_norm_(max_norm)
        self.reducer.reduce()
        if self.state.world_size == 1:  # torch's own (fused) norm: a one-process run's numbers, bit for bit
            return float(torch.nn.utils.clip_grad_norm_([p for _, p in params], max_norm or float("inf")))
        return clip_grad_norm_(self.model, params, max_norm, self.state)

    def update_expert_biases(self, skipped: bool = False) -> None:
        """After the optimizer step (or a skipped one): aux-loss-free balancing (expert_bias.py)."""
        update_expert_biases(self.model, self.state.dp_group, skipped)

    def sum_losses(self, lm: float, aux: float) -> tuple[float, float]:
        """This rank's loss contributions -> the global step's losses (sum over DP; the pipeline
        schedule already summed over its stages)."""
        lm, aux = all_reduce_floats([lm, aux], self.state.dp_group)
        return lm, aux


def checkpoint_step(path) -> int:
    """The global step a checkpoint folder was saved at (its meta.json)."""
    return int(json.loads((Path(path) / "meta.json").read_text()).get("global_step", -1))

