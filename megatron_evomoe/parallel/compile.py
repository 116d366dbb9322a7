"""apply_compile: torch.compile each decoder layer in place (placeholder for issue 15's version).

Compiling per layer (not the whole model) keeps the graphs small and identical across layers, so
Dynamo compiles one layer's graph and reuses it for the others (same code, same shapes).
"""
from __future__ import annotations

from torch import nn


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's layer list: model.layers (a bare DecoderLM) or model.llm.layers (MultimodalLM)."""
    layers = getattr(model, "layers", None)
    if layers is None:
        layers = getattr(getattr(model, "llm", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"apply_compile: {type(model).__name__} has no .layers or .llm.layers ModuleList")
    return layers


def apply_compile(model: nn.Module) -> nn.Module:
    """Compile every decoder layer in place with nn.Module.compile (default inductor); returns model."""
    for layer in decoder_layers(model):
        layer.compile()
    return model
