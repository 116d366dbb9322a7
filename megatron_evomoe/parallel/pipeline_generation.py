"""KV-cache decoding split over the pipeline stages: `generation.decode`'s step on one stage.

Each stage keeps the KV caches of its own decoder layers (`generation.new_caches` skips the layers
of other stages). One step: the first stage embeds the new ids (the prompt step also splices the
images), every stage runs its layers and sends `hidden` [B, T, C] to the next stage (one
`batch_isend_irecv` per exchange, as in 1F1B: `pipeline._p2p`), the last stage picks the next ids
from its logits, and a broadcast over the pipeline group gives those ids to every stage. Every
rank thus runs the same decoding loop on the same ids and stops at the same step; the TP ranks of
a stage run in step (their collectives are the sharded layers' own, as in one-stage TP decoding).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..generation import next_ids
from .pipeline import _p2p, _prepare_p2p
from .state import ParallelState, comm_device
from .watchdog import collective


class PipelineDecodeStep:
    """`step(model, ids, images, positions, caches, choose) -> next ids [B]` on this pipeline stage
    (`model` split by `split_pipeline`); called by every rank of the pipeline group in step."""

    def __init__(self, state: ParallelState):
        assert state.pp_size > 1, "one stage decodes with generation.one_process_step"
        self.state = state

    def __call__(self, model, ids: torch.Tensor, images, positions: torch.Tensor, caches, choose) -> torch.Tensor:
        st = self.state
        B, T = ids.shape
        param = next(model.parameters())  # hidden states travel in the parameters' dtype and device
        _prepare_p2p(st)
        if st.is_first_stage:
            h, modality = model.embed(ids, images)  # [B, T, C]
        else:  # every stage derives the modality mask from the ids: only hidden travels
            modality = model.modality(ids)
            shape = (B, T, model.llm.cfg.hidden_size)
            h = _p2p(st, recv_prev_shape=shape, dtype=param.dtype, device=param.device)[0]
        out, _ = model.llm(h, modality, positions, caches)  # hidden [B, T, C], logits on the last stage
        if st.is_last_stage:
            nxt = next_ids(model, out, choose).to(comm_device(st.pp_group))
        else:
            _p2p(st, send_next=out)
            nxt = torch.empty(B, dtype=torch.long, device=comm_device(st.pp_group))
        src = st.stage_rank(st.pp_size - 1)
        with collective(f"broadcast(next token ids from stage {st.pp_size - 1}, rank {src}) on the pipeline group",
                        st.pp_group):
            dist.broadcast(nxt, src=src, group=st.pp_group)
        return nxt.to(ids.device)


def decode_step_for(state: ParallelState):
    """The step function `generation.decode` needs on this rank: None (one process's) without PP."""
    return PipelineDecodeStep(state) if state.pp_size > 1 else None
