"""`train.compile`: torch.compile each decoder layer in place (torchtitan's apply_compile).

Per layer, not the whole model: the layers of one kind share a graph (Dynamo lifts parameters to
inputs, so a second layer of the same structure reuses the first one's code), compile time stays
that of one or two layers, and what runs between layers (pipeline sends, the skipped absent
slots) stays eager. `nn.Module.compile` compiles the layer's call in place: the module, its
parameter names and state_dict keys are unchanged, which checkpoints and stage patterns rely on.

A single-process MoE layer (router, permute, experts, unpermute, aux loss) has no graph break
(tests/moe/test_moe_compile.py); under expert parallelism the all-to-all split sizes are a
legitimate host read, so the graph breaks there and Dynamo runs that part eagerly (hence no
fullgraph here).

It is the last model transformation of `parallelize` (after TP and EP, whose hooks and modules it
captures). `parallelize` runs again after each stage's structure change; a layer that is compiled
already is left as it is: its compiled call re-traces by itself when a child changed (Dynamo
guards on the modules it traced), so nothing is compiled twice and no stale module runs.
"""
from __future__ import annotations

from torch import nn

from ..model.absent import is_absent

BACKEND = "inductor"  # the torch.compile backend (tests use the cheaper "aot_eager")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a MultimodalLM (model.llm.layers) or of a bare DecoderLM (model.layers)."""
    llm = getattr(model, "llm", model)
    if not isinstance(getattr(llm, "layers", None), nn.ModuleList):
        raise ValueError(f"train.compile: {type(model).__name__} has no decoder layers (llm.layers or layers)")
    return llm.layers


def is_compiled(module: nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


def apply_compile(model: nn.Module) -> nn.Module:
    """Compile every decoder layer of `model` in place (absent pipeline slots skipped; idempotent)."""
    for layer in decoder_layers(model):
        if not is_absent(layer) and not is_compiled(layer):
            layer.compile(backend=BACKEND)
    return model
