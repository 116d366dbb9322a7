"""Pipeline parallelism: stage split, P2P send/recv of activations and gradients, 1F1B schedule.

Split. Stage s of pp keeps decoder layers [s*L//pp, (s+1)*L//pp); the first stage also keeps
the vision tower, projector and token embedding, the last the final norm and LM head (and
computes the loss). The other modules become `PipelinePlaceholder`s without parameters, so
parameter names keep their global layer index (`llm.layers.3.mlp...` on whichever stage
owns layer 3) and stage patterns keep working.

Every stage reads the same micro-batches (token ids, labels and a packed row's positions and
segment ids are cheap) and runs the model's one forward (`MultimodalLM.forward`, which skips the
modules this stage lacks and computes the per-token modality mask and a packed row's attention
mask from the batch); only the hidden states [B, S(/tp), C] travel between stages.

Schedule (non-interleaved 1F1B, M micro-batches, stage s of P): s' = min(P-s-1, M) warm-up
forwards, then alternate one forward / one backward, then s' cool-down backwards, so at most
P-s micro-batches are in flight on stage s. Each forward step on a non-last stage returns its
output activation and its MoE aux losses; the backward of that step runs autograd on
[activation, aux] with [gradient received from the next stage, 1], so aux-loss gradients flow
on the stage that produced them. The last stage's step returns the LM loss contribution
(sum of token losses / supervised tokens of the global step) plus its aux losses. Reported
losses are summed over the stages (an all-reduce over the PP group, so every stage has them),
accumulated on the device and read once per step.

P2P. Each exchange with the neighbours (send this activation and receive a gradient, ...) is one
`batch_isend_irecv` on the pipeline group, which NCCL runs as one group; separate isend/irecv
calls deadlock in steady 1F1B under NCCL's ordering (`_p2p`; tests/parallel/nccl_emulation.py
emulates those rules on gloo).
"""
from __future__ import annotations

import contextlib
import weakref
from collections import deque

import torch
import torch.distributed as dist
from torch import nn

from ..config import moe_layer_indices
from ..model.llm import FFN
from ..model.absent import AbsentModule
from ..moe.evolution import EvolvingFFN
from ..moe.moe_layer import MoELayer
from .state import ParallelState, comm_device
from .watchdog import collective

TAG_ACTIVATION, TAG_GRADIENT = 1, 2


class PipelinePlaceholder(AbsentModule):
    """Stands for a decoder layer (or the embedding, final norm, LM head) of another stage.

    For a decoder layer it remembers what kind of FFN block the layer has ("dense", "evolve",
    "sparse"), so that stage structure changes can be replayed on a throwaway shadow (see
    `pipeline_shadows`) and draw the same random numbers as a single-process run.
    """

    def __init__(self, what: str, mlp_kind: str | None = None):
        super().__init__(what)
        self.mlp_kind = mlp_kind
        # `layer.mlp` reads None here (code that scans layers for MoE blocks skips it); a shadow
        # module is put in this slot only during a stage structure change
        self.register_module("mlp", None)


def _kind(mlp) -> str:
    if isinstance(mlp, MoELayer):
        return "sparse"
    return "evolve" if isinstance(mlp, EvolvingFFN) else "dense"


def stage_layer_range(num_layers: int, pp: int, stage: int) -> tuple[int, int]:
    """Decoder layers [start, stop) of pipeline stage `stage` (contiguous, balanced)."""
    return stage * num_layers // pp, (stage + 1) * num_layers // pp


def split_pipeline(model, state: ParallelState, cfg=None):
    """Keep only this stage's modules (idempotent). Returns the model."""
    if getattr(model, "pipeline_stage", None) is not None:
        return model
    llm = model.llm
    start, stop = stage_layer_range(len(llm.layers), state.pp_size, state.pp_rank)
    for i in range(len(llm.layers)):
        if not start <= i < stop:
            llm.layers[i] = PipelinePlaceholder(f"llm.layers.{i}", _kind(llm.layers[i].mlp))
    if not state.is_first_stage:
        model.vision = None
        model.projector = None
        llm.embed = PipelinePlaceholder("llm.embed")
    if not state.is_last_stage:
        llm.norm = PipelinePlaceholder("llm.norm")
        llm.lm_head = PipelinePlaceholder("llm.lm_head")
    model.pipeline_stage = (state.pp_rank, start, stop)
    return model


@contextlib.contextmanager
def pipeline_shadows(model, cfg):
    """Give the placeholders of MoE-designated layers a full-size zero-weight `mlp` of their kind
    for the duration of a stage structure change, then drop it (keeping the new kind)."""
    shadows = []
    for i in moe_layer_indices(cfg):
        layer = model.llm.layers[i]
        if isinstance(layer, PipelinePlaceholder):
            layer.mlp = _shadow(layer.mlp_kind, cfg)
            shadows.append(layer)
    try:
        yield
    finally:
        for layer in shadows:
            layer.mlp_kind = _kind(layer.mlp)
            layer.mlp = None


def _shadow(kind: str, cfg) -> nn.Module:
    C, F = cfg.model.hidden_size, cfg.model.ffn_hidden_size
    options = dict(activation=cfg.model.ffn_activation, bias=cfg.model.mlp_bias)  # the layer's own FFN
    if kind == "sparse":  # nothing converts a MoE layer further; only isinstance checks see it
        m = MoELayer.__new__(MoELayer)
        nn.Module.__init__(m)
        return m
    with torch.device("meta"):  # built without drawing from the global RNG
        m = EvolvingFFN(C, F, len(cfg.evolution.beta_ranges), **options) if kind == "evolve" else \
            FFN(C, F, **options)
    m = m.to_empty(device="cpu")
    with torch.no_grad():
        for t in list(m.parameters()) + list(m.buffers()):
            t.zero_()
    return m


def activation_shape(model, state: ParallelState, batch: dict) -> tuple[int, ...]:
    B, S = batch["input_ids"].shape
    tp = getattr(model, "tp", None)
    if tp is not None and tp.sequence_parallel and S % tp.size == 0:
        S //= tp.size
    return (B, S, model.llm.cfg.hidden_size)


# --------------------------------------------------------------------------------------------------
# P2P
# --------------------------------------------------------------------------------------------------
def _p2p(state: ParallelState, send_next=None, send_prev=None, recv_prev_shape=None, recv_next_shape=None,
         dtype=torch.float32, device="cpu"):
    """One exchange with the neighbouring stages, posted as ONE batch (`batch_isend_irecv`), then
    waited for. Separate isend/irecv calls would deadlock on NCCL: it runs the operations with one
    peer in posting order on one stream, and a send larger than its eager buffer completes only
    once the peer's receive runs, so in steady 1F1B two neighbours that both post their send first
    wait for each other forever. A batch is one NCCL group: its sends and receives start together.
    (At most one operation per peer and direction, so tags are not needed to match them.)"""
    group, s = state.pp_group, state.pp_rank
    ops, recv_prev, recv_next = [], None, None
    if send_next is not None:
        ops.append(dist.P2POp(dist.isend, send_next.detach().contiguous(), state.stage_rank(s + 1), group,
                              TAG_ACTIVATION))
    if send_prev is not None:
        ops.append(dist.P2POp(dist.isend, send_prev.contiguous(), state.stage_rank(s - 1), group, TAG_GRADIENT))
    if recv_prev_shape is not None:
        recv_prev = torch.empty(recv_prev_shape, dtype=dtype, device=device)
        ops.append(dist.P2POp(dist.irecv, recv_prev, state.stage_rank(s - 1), group, TAG_ACTIVATION))
    if recv_next_shape is not None:
        recv_next = torch.empty(recv_next_shape, dtype=dtype, device=device)
        ops.append(dist.P2POp(dist.irecv, recv_next, state.stage_rank(s + 1), group, TAG_GRADIENT))
    if not ops:  # (the first stage's turn in a steady step that has nothing to send back)
        return recv_prev, recv_next
    peers = [state.stage_rank(s + d) for d in (-1, 1) if 0 <= s + d < state.pp_size]
    with collective(_p2p_label(state, send_next, send_prev, recv_prev_shape, recv_next_shape), ranks=peers):
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    return recv_prev, recv_next


# pipeline groups whose communicator has carried a collective of all their ranks
_P2P_READY = weakref.WeakSet()


def _prepare_p2p(state: ParallelState) -> None:
    """Before the first batched send/recv on the pipeline group: one all-reduce of all its ranks.

    On NCCL a batch runs on the group's communicator, which the group's first collective creates;
    torch requires every rank of the group to take part in that first call, while 1F1B's first
    exchange involves stages 0 and 1 only (see `torch.distributed.batch_isend_irecv`)."""
    group = state.pp_group
    if group is None or group in _P2P_READY:  # (None: one stage, nothing is sent)
        return
    with collective("all_reduce(before the first send/recv) on the pipeline group", group):
        dist.all_reduce(torch.zeros(1, device=comm_device(group)), group=group)
    _P2P_READY.add(group)


def _p2p_label(state: ParallelState, send_next, send_prev, recv_prev_shape, recv_next_shape) -> str:
    """'send/recv(activations to stage 1, ...) on the pipeline group' for watchdog messages."""
    s, parts = state.pp_rank, []
    for item, what, peer in ((send_next, "send activations to", s + 1), (send_prev, "send gradients to", s - 1),
                             (recv_prev_shape, "recv activations from", s - 1),
                             (recv_next_shape, "recv gradients from", s + 1)):
        if item is not None:
            parts.append(f"{what} stage {peer} (rank {state.stage_rank(peer)})")
    return f"send/recv({', '.join(parts)}) on the pipeline group, at stage {s}"


# --------------------------------------------------------------------------------------------------
# 1F1B
# --------------------------------------------------------------------------------------------------
def forward_backward_1f1b(model, state: ParallelState, micro_batches: list[dict], num_tokens: int,
                          device: torch.device | str = "cpu", autocast_dtype=None, before_last_backward=None) -> dict:
    """Run forward and backward of all micro-batches of one step on this stage (gradients
    accumulate in .grad). `num_tokens`: supervised tokens of the whole step over all DP ranks.
    `before_last_backward`: called once, just before this stage's last backward (the gradient
    reducer then starts its buckets during it: GradientReducer.final_backward).

    Returns {"lm_loss", "aux_loss"}: this DP rank's contributions summed over the stages.
    """
    M, P, s = len(micro_batches), state.pp_size, state.pp_rank
    first, last = state.is_first_stage, state.is_last_stage
    dtype = next(model.parameters()).dtype  # activations travel in the parameters' dtype and device
    pdev = next(model.parameters()).device
    warmup = min(P - s - 1, M)
    steady = M - warmup
    in_flight = deque()
    # [lm, aux] accumulated where the losses are, read once at the end (no host sync per micro-batch)
    totals = torch.zeros(2, dtype=torch.float64, device=pdev)
    shape = lambda i: activation_shape(model, state, micro_batches[i])  # noqa: E731

    def fwd(i, h_in):
        batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in micro_batches[i].items()}
        if h_in is not None:
            h_in = h_in.to(device).requires_grad_()
        with torch.autocast(torch.device(device).type, dtype=autocast_dtype or torch.bfloat16,
                            enabled=autocast_dtype is not None):
            res = model(batch["input_ids"], batch.get("images"), batch["labels"], hidden=h_in,
                        positions=batch.get("positions"), segment_ids=batch.get("segment_ids"))
        out, aux, lm_sum = res.hidden, res.aux_loss / M, res.lm_loss_sum
        totals[1] += aux.detach().to(totals.device, torch.float64)
        if last:
            loss = lm_sum / max(num_tokens, 1) + aux
            totals[0] += lm_sum.detach().to(totals.device, torch.float64) / max(num_tokens, 1)
            in_flight.append((h_in, loss, None))
            return None
        in_flight.append((h_in, out, aux))
        return out

    num_backward = [0]

    def bwd(grad_out):
        h_in, out, aux = in_flight.popleft()
        num_backward[0] += 1
        if num_backward[0] == M and before_last_backward is not None:
            before_last_backward()
        if last:
            tensors, grads = [out], [torch.ones_like(out)]
        else:
            tensors, grads = [out, aux], [grad_out.to(out.dtype), torch.ones_like(aux)]
        # nothing to do where this stage trains nothing and receives no trainable input (e.g. the
        # first stage while only later layers train): the zero gradient sent back is ignored
        pairs = [(t, g) for t, g in zip(tensors, grads) if t.requires_grad]
        if pairs:
            torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
        if h_in is None:
            return None
        return h_in.grad if h_in.grad is not None else torch.zeros_like(h_in)

    _prepare_p2p(state)
    for i in range(warmup):
        h_in = None if first else _p2p(state, recv_prev_shape=shape(i), dtype=dtype, device=pdev)[0]
        out = fwd(i, h_in)
        _p2p(state, send_next=out)
    h_in = None
    if steady and not first:
        h_in = _p2p(state, recv_prev_shape=shape(warmup), dtype=dtype, device=pdev)[0]
    for j in range(steady):
        i = warmup + j
        out = fwd(i, h_in)
        # send this activation and receive the gradient of the oldest in-flight micro-batch
        grad = None if last else _p2p(state, send_next=out, recv_next_shape=shape(i - warmup), dtype=dtype, device=pdev)[1]
        g_in = bwd(grad)
        if j == steady - 1:
            if not first:
                _p2p(state, send_prev=g_in)
        else:
            h_in = _p2p(state, send_prev=None if first else g_in,
                        recv_prev_shape=None if first else shape(i + 1), dtype=dtype, device=pdev)[0]
    for k in range(warmup):
        i = steady + k
        grad = None if last else _p2p(state, recv_next_shape=shape(i), dtype=dtype, device=pdev)[1]
        g_in = bwd(grad)
        if not first:
            _p2p(state, send_prev=g_in)
    totals = totals.to(comm_device(state.pp_group))
    if state.pp_group is not None:
        with collective("all_reduce(losses) on the pipeline group", state.pp_group):
            dist.all_reduce(totals, group=state.pp_group)
    totals = totals.cpu()
    return {"lm_loss": float(totals[0]), "aux_loss": float(totals[1])}
