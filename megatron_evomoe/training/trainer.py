"""The staged trainer: runs every stage of the config in order, resumable at any step.

One optimizer step = the stage's global batch (`stages.<name>.global_batch_size`, default
`train.global_batch_size`), run as global / (micro_batch_size x dp) micro-batches per data-parallel
rank; the LM loss is the sum of token losses divided by the number of supervised tokens in the
whole step, so it does not depend on how the step is split. Checkpoints carry everything a
resumed run needs to continue the same trajectory: model, optimizer, stage and
step, sampler position, RNG states and the evolution generator.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import checkpointing as ckpt
from ..config import Config, ConfigError, check_global_batches
from ..data.errors import DataError
from ..model.mllm import IGNORE_INDEX
from ..parallel.config_agreement import agree_on_config
from ..parallel.launch import rank0_first
from ..parallel.pipeline_generation import decode_step_for
from ..parallel.state import ParallelState
from ..parallel.training_hooks import ParallelTraining, checkpoint_step
from ..parallel.watchdog import collective, set_step
from ..run_lock import RunLock
from ..stages.structure import build_model, evolution_scheduler
from .cpu_allocator import use_caching_allocator
from .data_log import DataLog
from .data_setup import check_stage_data, prepare_data
from .evaluation import evaluate_pope
from .logger import MetricsLogger
from .nonfinite import NonFiniteError, first_nonfinite_grad
from .optim import build_optimizer, lr_at
from ..dcp_reading import read_plain
from ..parallel.distributed_checkpoint import saved_layout
from ..parallel.reshard import refuse_per_rank_checkpoints
from .background_save import BackgroundSave
from .rng_state import rng_state, seed_everything, set_rng_state
from .restore import check_init_image_processing, refuse_imported_save_dir
from .routing_log import RoutingLog
from .stage_data import StageData
from .stop_request import StopRequest, TrainingStopped
from .throughput import ThroughputMeter, global_step_counts, resolve_peak

log = logging.getLogger("megatron_evomoe")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: 'cuda' requested but no CUDA device is available")
    return torch.device(name)


class Trainer:
    def __init__(self, cfg: Config, parallel_state: ParallelState | None = None):
        """parallel_state: this process's place in the layout (parallel/launch.py::init_distributed);
        None means one process (`ParallelState.single`)."""
        self.cfg = cfg
        t = cfg.train
        if t.num_threads:
            torch.set_num_threads(t.num_threads)
        if t.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.device = resolve_device(t.device)
        if self.device.type == "cpu" and t.cpu_allocator == "caching":
            use_caching_allocator()
        seed_everything(t.seed)
        self.save_dir = Path(t.save_dir)
        state = parallel_state if parallel_state is not None else ParallelState.single(cfg)
        # every stage's global batch splits into whole micro-batches per DP rank (under PP: the pipeline's)
        check_global_batches(cfg, state.dp_size)
        # one run per save_dir, before anything is written there (global rank 0 holds it for the job)
        self.run_lock = RunLock.acquire(self.save_dir) if state.rank == 0 else None
        with rank0_first(state):  # rank 0 builds the bundled dataset, the others wait for it
            self.data = prepare_data(cfg)
        agree_on_config(state, cfg)  # every rank resolved the same config (the tokenizer's vocabulary too)
        self.tokenizer = self.data.tokenizer
        # sharded construction: the model is built on the meta device (shapes only) and parallelized
        # there; each rank then gives storage and initial values to its own shards only, the values
        # of the one-process model with the same train.seed (parallel/sharded_construction.py)
        with torch.device("meta"):
            self.model = build_model(cfg, self.tokenizer.image_token_id)
        self.par = ParallelTraining(self.model, state, cfg)
        self.par.materialise(self.device, t.seed)
        # Upcycling/router creation draws from its own generator, so the stage
        # transition is reproducible whether or not the run was resumed.
        self.structure_gen = torch.Generator().manual_seed(t.seed + 7919)
        self.metrics = MetricsLogger(self.save_dir, t.tensorboard, enabled=self.par.is_main,
                                     wandb_project=t.wandb_project, config=cfg.to_dict())
        self.saves = BackgroundSave(t.async_save)  # checkpoint writes, in the background with train.async_save
        self.global_step = 0
        self.history: list[dict] = []  # per-step records, for tests and reports
        self.stop = StopRequest(t.exit_signal)  # SIGTERM / SIGINT / train.exit_signal: stop with a checkpoint

    # ------------------------------------------------------------------ run
    def run(self) -> list[dict]:
        self.stop.install()
        failing = True
        try:
            history = self._run()
            failing = False
            return history
        finally:
            self.saves.close(failing)  # the last checkpoint is on disk before the process can end
            self.stop.restore()
            self.metrics.close()
            if self.run_lock is not None:  # (the save_dir is free for the next run of this process too)
                self.run_lock.release()

    def _run(self) -> list[dict]:
        state = self._load_latest()
        start_stage = state["stage_idx"] if state else 0
        check_stage_data(self.data, self.cfg, self.cfg.stages[start_stage:])  # bad data: stop before any work
        if state is None and self.cfg.train.init_from:
            self._init_weights(self.cfg.train.init_from)
        for idx, stage in enumerate(self.cfg.stages):
            if idx < start_stage:  # replay structure only; weights come from the checkpoint
                self._apply_structure(stage)
                continue
            resume = state if state and state["stage_idx"] == idx else None
            self._run_stage(idx, stage, resume)
        return self.history

    def _apply_structure(self, stage) -> None:
        # under TP/EP: unshard the FFNs that change, convert as one process would, reshard
        with collective(f"stage '{stage.name}' structure change (TP/EP gathers, router broadcast)"):
            self.par.apply_stage_structure(stage, self.structure_gen)

    def _load_latest(self) -> dict | None:
        if not self.cfg.train.resume:
            return None
        refuse_imported_save_dir(self.cfg)  # an HF import's folder holds weights, nothing to resume
        with collective("resume: all_reduce(MIN of the newest checkpoint step) over all ranks"):
            path = self.par.newest_common_checkpoint(self.save_dir)
        if path is None:
            refuse_per_rank_checkpoints(self.save_dir)
        with collective("resume: all_reduce(checkpoint step) over all ranks"):  # all ranks resume the same step
            self.par.agree_on_step(-1 if path is None else checkpoint_step(path))
        if path is None:
            return None
        state = self._read_plain(path)
        if not 0 <= state["stage_idx"] < len(self.cfg.stages):
            raise ckpt.CheckpointError(f"resume: {path} is from stage {state['stage_idx'] + 1}, but the config has "
                                       f"{len(self.cfg.stages)} stages; use a new train.save_dir or train.resume=false")
        self._check_stage_names(state, path)
        log.info("resuming from %s (stage %s, step %d)", path, self.cfg.stages[state["stage_idx"]].name, state["step"])
        return state

    def _read_plain(self, path) -> dict:
        """The checkpoint's state; of a distributed one only the plain part (each rank loads its own
        boxes of the tensors later): this rank's own in the same layout, else rank 0's."""
        if not ckpt.is_distributed(path):
            return ckpt.load_checkpoint(path)
        same = saved_layout(path) == self.par.layout
        return {**read_plain(path, self.par.state.rank if same else 0), "dcp_folder": path}

    def _check_stage_names(self, state: dict, path) -> None:
        """A resumed run continues stage `stage_idx` of the checkpoint's stage list: the config's stages up to
        it must be the same ones (matching by index alone would resume into another stage)."""
        idx = state["stage_idx"]
        saved = [st.get("name") for st in (state.get("config") or {}).get("stages", [])][: idx + 1]
        now = [st.name for st in self.cfg.stages[: idx + 1]]
        if not saved or saved == now:
            return
        i = next((i for i, (a, b) in enumerate(zip(saved, now)) if a != b), min(len(saved), len(now)))
        raise ckpt.CheckpointError(
            f"resume: {path} was saved in stage {saved[-1]!r} of the stage list {saved}, but the config's stages "
            f"are {now}: stages[{i}] is {now[i] if i < len(now) else None!r} here and "
            f"{saved[i] if i < len(saved) else None!r} in the checkpoint; restore the stage list, or use a new "
            "train.save_dir (or train.resume=false)")

    def _init_weights(self, path: str) -> None:
        """Load pretrained weights (e.g. an imported HF checkpoint) into the stage-0 model."""
        try:
            found = ckpt.resolve_checkpoint(path)
        except ckpt.CheckpointError as e:
            raise ckpt.CheckpointError(f"train.init_from: {e}") from None
        state = ckpt.load_checkpoint(found, mmap=True)  # each rank reads only its slices of the tensors
        check_init_image_processing(self.cfg, state, found)
        self.par.load_full_weights(state, f"train.init_from: {found}")
        log.info("initialised the model from %s", found)

    # ---------------------------------------------------------------- stage
    def _run_stage(self, idx: int, stage, resume: dict | None) -> None:
        run = self._begin_stage(idx, stage, resume)
        try:
            if run.step >= stage.steps:  # resumed from the stage's end: the move to the next is left, and
                if not self._evaluated(idx, stage):  # the evaluation if a stop came between the two
                    self._evaluate_stage(stage)
                return
            self._train_stage(run)
        finally:
            run.data.close()  # (the loader's workers)
        # the stage-end checkpoint comes before the evaluation: an evaluation that fails costs no training
        self._save(idx, stage.steps, run.opt, run.data, run.evo, stage_end=True)
        self._evaluate_stage(stage)

    def _begin_stage(self, idx: int, stage, resume: dict | None) -> "StageRun":
        """Structure, trainable set, optimizer and data of a stage; restored from `resume` if given."""
        cfg = self.cfg
        self._apply_structure(stage)
        with collective(f"stage '{stage.name}' set-up (all_reduce of the trainable patterns on the pipeline group)"):
            trainable = self.par.set_trainable(stage, idx)
        params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        betas = tuple(cfg.train.adam_betas)
        # the stage's bucketed DP / expert-DP gradient reducer, or its ZeRO-1 optimizer
        # (parallel.zero1: AdamW state sharded over the replicas)
        opt = self.par.start_stage(params, stage.lr, cfg.train.weight_decay, betas)
        if opt is None:
            # a pipeline stage may hold none of this stage's trainable tensors (e.g. the projector stage
            # on the last pipeline stage): its optimizer gets one empty placeholder tensor
            opt_params = params or [("pipeline_idle", torch.nn.Parameter(torch.zeros(0, device=self.device)))]
            opt = build_optimizer(opt_params, stage.lr, cfg.train.weight_decay, betas, self.device)
        evo = evolution_scheduler(self.model, cfg) if stage.moe_mode == "evolve" else None
        data = StageData(self.data, stage, cfg, seed=cfg.train.seed + 1000 * idx, rank=self.par.state.dp_rank,
                         world_size=self.par.state.dp_size, device=self.device)
        run = StageRun(idx, stage, opt, params, data, evo)
        if resume is not None:
            run.step = run.saved_step = self._restore(resume, opt, data, evo)
        else:
            log.info("=== stage %d/%d '%s': %d steps, moe_mode=%s, %d trainable tensors (%s params), global batch "
                     "%d (%d x %d micro-batches x dp %d)", idx + 1, len(cfg.stages), stage.name, stage.steps,
                     stage.moe_mode, len(trainable), f"{sum(p.numel() for _, p in params):,}", data.global_batch,
                     cfg.train.micro_batch_size, data.accumulation, self.par.state.dp_size)
        if self.par.is_main:
            data.log_index_counts()
        return run

    def _train_stage(self, run: "StageRun") -> None:
        cfg, stage = self.cfg, run.stage
        routing, data_log = RoutingLog(self.model), DataLog(run.data)
        pbar = _progress(cfg.train.progress_bar and self.par.is_main, stage, run.step)
        state = self.par.state
        speed = ThroughputMeter(cfg, stage.moe_mode, state.world_size,
                                resolve_peak(cfg, self.device, verbose=self.par.is_main))
        while run.step < stage.steps:
            lr = lr_at(run.step, stage.steps, stage.lr, stage.min_lr, stage.warmup_steps, stage.schedule) * run.lr_scale
            for g in run.opt.param_groups:
                g["lr"] = lr
            micro = self._next_micro_batches(run)
            try:
                record, counts = self._train_step(run.opt, run.params, micro, run.evo, run.step, stage)
            except NonFiniteError:  # train.nonfinite=stop: the steps before this one are kept
                self._save_before_stop(run)
                raise
            if cfg.data.skip_bad_samples:
                record["bad_samples_skipped"] = run.data.num_skipped
            if record.get("skipped") and cfg.train.nonfinite == "reduce_lr":
                run.lr_scale *= 0.5
            record["samples"] = data_log.step()
            run.step += 1
            self.global_step += 1
            speed.step(*counts)  # (supervised tokens, positions, images of the step, all DP ranks)
            record.update(stage=stage.name, stage_step=run.step, global_step=self.global_step, lr=lr)
            self.history.append(record)
            if pbar is not None:
                pbar.update(1)
                pbar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.1e}")
            if run.step % cfg.train.log_interval == 0 or run.step == stage.steps:
                speed_scalars, speed_text = speed.summary_and_reset()
                data_scalars, data_text = data_log.summary_and_reset()
                record.update({**speed_scalars, **data_scalars})
                self._log(record, routing, run.evo, speed_text + data_text)
            if cfg.train.save_interval and run.step % cfg.train.save_interval == 0 and run.step < stage.steps:
                self._save(run.idx, run.step, run.opt, run.data, run.evo, stage_end=False)
                run.saved_step = run.step
        if pbar is not None:
            pbar.close()
        routing.close()
        if self.par.is_main:
            data_log.log_stage_end(stage.name)

    def _next_micro_batches(self, run: "StageRun") -> list[dict]:
        """This step's micro-batches, once every rank has them and no rank was asked to stop.

        A sample that fails to load on any rank, or a stop signal on any rank, stops every rank at this
        step boundary (one all-reduce of the two flags), after the checkpoint of the steps done so far:
        the data stream is rewound to the start of the step, so a rerun continues the same trajectory."""
        set_step(self.global_step + 1)  # (named in the errors of a dead or hung rank)
        start = run.data.state_dict()
        error = None
        try:
            micro = run.data.next_batches()
        except DataError as e:  # (images are decoded lazily: a corrupt file shows here)
            error = e
        with collective("all_reduce(stop and bad-sample flags) over all ranks"):
            stop, bad = self.par.any_rank([self.stop.requested, error is not None])
        if not (stop or bad):
            return micro
        run.data.load_state_dict(start)
        self._save_before_stop(run)
        where = f"stage '{run.stage.name}' step {run.step + 1}"
        if error is not None:
            log.error("a sample failed to load at %s; the steps before it are checkpointed: fix or remove the "
                      "file (or set data.skip_bad_samples=true) and rerun to resume", where)
            raise error
        if bad:
            raise DataError(f"stopped at {where}: a sample failed to load on another rank (its error names the "
                            "file); the steps before it are checkpointed", reason="other_rank")
        raise TrainingStopped(f"stopped by {self.stop.describe()} at {where}; the steps before it are "
                              f"checkpointed in {self.save_dir}: rerun the same command to resume")

    def _evaluated_marker(self, idx: int, stage) -> Path:
        """Written into the stage-end checkpoint once its evaluation is done (or failed on bad data)."""
        return ckpt.checkpoint_root(self.save_dir) / f"{idx:02d}-{stage.name}-step{stage.steps:06d}" / "evaluated"

    def _evaluated(self, idx: int, stage) -> bool:
        return not (stage.eval and self.cfg.data.num_eval_samples > 0) or self._evaluated_marker(idx, stage).exists()

    def _mark_evaluated(self, stage, outcome: str) -> None:
        self.saves.wait()  # (the stage-end checkpoint's folder exists once its write is done)
        if self.par.is_main:
            ckpt.write_file_atomic(self._evaluated_marker(self.cfg.stages.index(stage), stage), outcome)

    def _evaluate_stage(self, stage) -> None:
        cfg = self.cfg
        if not (stage.eval and cfg.data.num_eval_samples > 0):
            return
        try:  # under TP/EP/DP/PP every rank evaluates in step (PP: pipelined decoding, same answers)
            with collective(f"stage '{stage.name}' POPE evaluation (tensor/expert/pipeline-parallel collectives)"):
                scores = evaluate_pope(self.model, self.data, cfg, self.device, stage_idx=cfg.stages.index(stage),
                                       step=decode_step_for(self.par.state))
        except DataError:  # e.g. an unreadable evaluation image: the stage's checkpoint is already saved
            self._mark_evaluated(stage, "failed: bad evaluation data")
            log.error("stage '%s' evaluation failed; its checkpoint is saved and a rerun continues with "
                      "the next stage without repeating this evaluation", stage.name)
            raise
        log.info("stage '%s' POPE (held-out, %d questions): acc %.3f  precision %.3f  recall %.3f  "
                 "F1 %.3f  yes-ratio %.3f | blank images (text prior only): acc %.3f  F1 %.3f",
                 stage.name, scores["num_questions"], scores["accuracy"], scores["precision"],
                 scores["recall"], scores["f1"], scores["yes_ratio"], scores["blind_accuracy"],
                 scores["blind_f1"])
        self.metrics.log(self.global_step, {f"eval/{stage.name}/{k}": v for k, v in scores.items()})
        self.history.append({"stage": stage.name, "eval": scores})
        self._mark_evaluated(stage, "done")

    def _train_step(self, opt, params, micro, evo, step, stage):
        cfg = self.cfg
        num_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)
        # the loss is normalised by the supervised tokens of the global step
        # (the log's positions and images ride along: throughput.py)
        with collective("all_reduce(token count) on the data-parallel group", self.par.state.dp_group):
            counts = global_step_counts(micro, num_tokens, self.par.state.dp_group)
        num_tokens = counts[0]
        opt.zero_grad(set_to_none=True)
        lm_total, aux_total = 0.0, 0.0
        # (lm, aux) summed on the device in fp64, in micro-batch order: the same additions as Python
        # floats would do (bit-identical logs), read back once per step instead of twice per micro-batch
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        with collective("forward/backward (tensor-parallel all-reduces, router statistics, expert all-to-all)"):
            if self.par.pipeline:
                lm_total, aux_total = self.par.forward_backward(micro, num_tokens, self.device, cfg.train.bf16)
                micro = []  # the 1F1B schedule ran forward and backward
            for i, batch in enumerate(micro):
                batch = {k: v.to(self.device) for k, v in batch.items()}
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.train.bf16):
                    out = self.model(batch["input_ids"], batch["images"], batch["labels"],
                                     positions=batch.get("positions"), segment_ids=batch.get("segment_ids"))
                lm = out.lm_loss_sum / max(num_tokens, 1)
                aux = out.aux_loss / len(micro)
                if i == len(micro) - 1:  # the gradient all-reduce overlaps this backward
                    self.par.final_backward()
                (lm + aux).backward()
                totals = totals + torch.stack([lm.detach().double(), aux.detach().double()])
            if micro:
                lm_total, aux_total = totals.tolist()
        # all-reduce gradients (DP / expert-DP), norm over all shards, clip
        with collective("gradient reduction and clipping (data-parallel groups, norm over all ranks)"):
            grad_norm = self.par.reduce_and_clip(params, cfg.train.clip_grad)
        with collective("all_reduce(losses) on the data-parallel group", self.par.state.dp_group):
            lm_total, aux_total = self.par.sum_losses(lm_total, aux_total)
        record = {"loss": lm_total + aux_total, "lm_loss": lm_total, "aux_loss": aux_total, "grad_norm": grad_norm}
        if not np.isfinite(record["loss"]) or not np.isfinite(grad_norm):
            where = first_nonfinite_grad(params)
            msg = (f"non-finite {'loss' if not np.isfinite(record['loss']) else 'gradient'} at stage "
                   f"'{stage.name}' step {step + 1}" + (f", first in parameter {where}" if where else ""))
            if cfg.train.nonfinite == "stop":
                raise NonFiniteError(msg)
            log.warning("%s: step skipped (train.nonfinite=%s)", msg, cfg.train.nonfinite)
            opt.zero_grad(set_to_none=True)
            self.par.update_expert_biases(skipped=True)
            record["skipped"] = True
            return record, counts
        if evo is not None:
            evo.before_step()
        opt.step()
        self.par.update_expert_biases()  # (aux-loss-free balancing; nothing to do without it)
        if evo is not None:
            self.par.wait_for_params()  # the evolution reads FFN1's new values (ZeRO-1 gathers them asynchronously)
            evo.after_step()
        return record, counts

    # ------------------------------------------------------------- logging
    def _log(self, record: dict, routing: RoutingLog, evo, extra: str = "") -> None:
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if evo is not None:
            dist = evo.distances()
            per_expert = np.mean(np.array(dist), axis=0)
            for n, d in enumerate(per_expert):
                scalars[f"evolution/distance_expert{n + 2}"] = float(d)
            extra += " | dist from FFN1 " + " ".join(f"e{n + 2}={d:.2e}" for n, d in enumerate(per_expert))
        routing_scalars, routing_text = routing.summary_and_reset()
        scalars.update(routing_scalars)
        extra += routing_text
        self.metrics.log(self.global_step, {f"train/{k}" if "/" not in k else k: v for k, v in scalars.items()})
        log.info("[%s %d] loss %.4f (lm %.4f aux %.4f) | lr %.2e | grad %.2f%s",
                 record["stage"], record["stage_step"], record["loss"], record["lm_loss"], record["aux_loss"],
                 record["lr"], record["grad_norm"], extra)

    # ---------------------------------------------------------- checkpoint
    def _save(self, idx, step, opt, data, evo, stage_end: bool) -> None:
        plain = {
            "stage_idx": idx,
            "step": step,
            "global_step": self.global_step,
            "data": data.state_dict(),
            "rng": rng_state(),
            "structure_gen": self.structure_gen.get_state(),
            "evolution": evo.state_dict() if evo is not None else None,
            "config": self.cfg.to_dict(),
        }
        stage = self.cfg.stages[idx]
        name = f"{idx:02d}-{stage.name}-step{step:06d}"
        meta = {"stage": stage.name, "stage_idx": idx, "step": step, "global_step": self.global_step,
                "stage_end": stage_end}
        # (model and optimizer: state.pt for one process, each rank's boxes of a distributed checkpoint)
        write = self.par.checkpoint_write(self.save_dir, name, plain, opt, meta, self.cfg.train.keep_checkpoints,
                                          staged=self.saves.enabled)

        def save_and_log():
            log.info("saved checkpoint %s", write())
        self.saves.submit(save_and_log)

    def _save_before_stop(self, run: "StageRun") -> None:
        """A checkpoint of the steps done since the last one, before a stop (bad data, a signal, a non-finite
        step): nothing has moved since the step boundary, so a rerun continues the same trajectory."""
        if run.step in (0, run.saved_step):  # the stage's start (the previous stage end covers it) / just saved
            return
        self._save(run.idx, run.step, run.opt, run.data, run.evo, stage_end=False)
        self.saves.wait()  # (the stop is reported once this checkpoint is on disk)
        run.saved_step = run.step

    def _restore(self, state: dict, opt, data, evo) -> int:
        stage = self.cfg.stages[state["stage_idx"]]
        load_opt = state["step"] < stage.steps
        # this layout's own shard, or a consolidated checkpoint resharded
        where = f"resume: the checkpoint of stage '{stage.name}' step {state['step']} in {self.save_dir}"
        self.par.load_state(state, opt, load_opt, where)
        data.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        self.structure_gen.set_state(state["structure_gen"])
        if evo is not None and state["evolution"] is not None:
            evo.load_state_dict(state["evolution"])
        self.global_step = state["global_step"]
        return state["step"]


def _progress(enabled: bool, stage, start: int):
    """A tqdm bar on a terminal only: a batch job's log (SLURM) gets the periodic log lines, not every redraw."""
    if not (enabled and sys.stderr.isatty()):
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=stage.steps, initial=start, desc=stage.name, leave=False, dynamic_ncols=True)


@dataclass
class StageRun:
    """What a stage's loop carries: its optimizer, trainable parameters, data stream, evolution scheduler,
    the step reached, the step of its last checkpoint, and the LR scale of train.nonfinite=reduce_lr."""
    idx: int
    stage: object
    opt: object
    params: list
    data: StageData
    evo: object
    step: int = 0
    saved_step: int = -1
    lr_scale: float = 1.0
