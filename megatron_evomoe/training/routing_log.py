"""Per-expert load and per-modality routing, accumulated between log lines.

Per MoE layer (this rank's tokens): the load fraction of each expert, and overall, for image and for text
tokens the load's coefficient of variation and its max violation (MaxVio), so a run shows its balancing
working or failing while it trains; the image/text JS divergence of the routing.
"""
from __future__ import annotations

from ..model.modality import IMAGE, TEXT
from ..moe.metrics import RoutingCounter, js_divergence, load_cv, load_fractions, max_violation
from ..stages.structure import moe_layers


class RoutingLog:
    """Hooks every MoE layer of the model; `summary_and_reset()` gives scalars and a log fragment."""

    def __init__(self, model):
        self.counter = RoutingCounter()
        self.layers = moe_layers(model)
        for idx, layer in self.layers:
            layer.routing_hook = self._hook(idx)

    def _hook(self, idx: int):
        def hook(layer, routing, modality):
            self.counter.add(idx, routing.topk_idx.detach(), modality, layer.experts.num_experts)
        return hook

    def summary_and_reset(self) -> tuple[dict, str]:
        scalars, parts = {}, []
        for layer, c in sorted(self.counter.counts.items()):  # c: [M, E]
            total = c.sum(0)
            frac = load_fractions(total)
            for e, f in enumerate(frac.tolist()):
                scalars[f"moe/layer{layer}/load_expert{e}"] = f
            scalars[f"moe/layer{layer}/load_cv"] = load_cv(total)
            scalars[f"moe/layer{layer}/maxvio"] = max_violation(total)
            for name, counts in (("image", c[IMAGE]), ("text", c[TEXT])):
                if counts.sum() > 0:
                    scalars[f"moe/layer{layer}/{name}/load_cv"] = load_cv(counts)
                    scalars[f"moe/layer{layer}/{name}/maxvio"] = max_violation(counts)
            img, txt = load_fractions(c[IMAGE]), load_fractions(c[TEXT])
            text = f" L{layer} img[{' '.join(f'{x:.2f}' for x in img.tolist())}]" \
                   f" txt[{' '.join(f'{x:.2f}' for x in txt.tolist())}]" \
                   f" cv={scalars[f'moe/layer{layer}/load_cv']:.2f} maxvio={scalars[f'moe/layer{layer}/maxvio']:.2f}"
            if c[IMAGE].sum() > 0 and c[TEXT].sum() > 0:
                js = js_divergence(c[IMAGE].double() + 1e-12, c[TEXT].double() + 1e-12)
                scalars[f"moe/layer{layer}/js_image_text"] = js
                text += f" js={js:.3f}"
            parts.append(text)
        self.counter.reset()
        return scalars, (" | routing" + "".join(parts)) if parts else ""

    def close(self) -> None:
        for _, layer in self.layers:
            layer.routing_hook = None
