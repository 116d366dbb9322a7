"""Ops that models call: ``torch.library`` custom ops (each with a fake, and its backward registered
with ``register_autograd``), each picking the CUDA extension, compiled Triton or PyTorch at run time
(see ``backend.py``) and logging its choice.

    from megatron_evomoe.ops.grouped_gemm import grouped_mm   # grouped_mm(x, w, offsets, backend="auto") -> y
    from megatron_evomoe.ops.permute import permute, unpermute
        # permute(x, topk_idx, num_experts, backend="auto") -> (x_perm, row_map, counts)
        # unpermute(y_perm, row_map, gates, backend="auto") -> y
    from megatron_evomoe.ops.topk_softmax import topk_softmax  # linear router: (probs, topk_idx, gates)
    from megatron_evomoe.ops.dtr import dtr_route              # Dynamic Token-aware Router

The ``permute`` function is deliberately not re-exported here: the name would shadow the
``megatron_evomoe.ops.permute`` module (``import megatron_evomoe.ops.permute as m`` would then
return the function). Import it from its module, as above.
"""
from .backend import BACKENDS, BackendUnavailableError, resolve_backend
from .grouped_gemm import grouped_mm
from .permute import unpermute

__all__ = [
    "BACKENDS", "BackendUnavailableError", "resolve_backend",
    "grouped_mm",
    "unpermute",
]
