"""Run a trained MoE model over held-out data and measure its routing and expert diversity.

Per MoE layer and modality: expert load, load CV, routing entropy, image/text JS
divergence, router logits; expert homogeneity as pairwise output cosine and
linear CKA on the same tokens (weight cosine beside them only); and the
router-shuffle test on POPE and on the LM loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.image_processing import ImageProcessor
from ..data.llava_dataset import LlavaDataset
from ..model.modality import IMAGE, TEXT
from ..moe import metrics as M
from ..moe.experts import every_expert_output
from ..moe.router_shuffle import shuffled_routers
from ..data.conversation_templates import stage_template
from ..training.evaluation import evaluate_pope
from ..stages.structure import moe_layers




class _Recorder:
    """Routing hook: keeps router logits, choices and (a sample of) the layer's input tokens."""

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self.logits, self.modality, self.choices, self.inputs = [], [], [], []

    def __call__(self, layer, routing, modality):
        self.logits.append(routing.logits.detach().float().cpu())
        self.choices.append(routing.topk_idx.detach().cpu())
        self.modality.append(modality.detach().cpu())

    def input_hook(self, module, args):
        if sum(x.shape[0] for x in self.inputs) < self.max_tokens:
            self.inputs.append(args[0].detach().reshape(-1, args[0].shape[-1]).cpu())


@torch.no_grad()
def lm_loss(model, batches) -> float:
    total, count = 0.0, 0
    for b in batches:
        out = model(b["input_ids"], b["images"], b["labels"])
        total += float(out.lm_loss_sum)
        count += int(out.num_tokens)
    return total / max(count, 1)


@torch.no_grad()
def analyze(model, cfg, bundle, num_samples: int = 128, batch_size: int = 32, max_tokens: int = 512,
            shuffle_seed: int = 0, pope: bool = True, stage_idx: int = -1, lm_file: str = "instruct.json") -> dict:
    """`stage_idx`: the checkpoint's stage, whose conversation template the data is rendered with.
    `lm_file`: the records (under the data root) whose last `num_samples` give the LM loss and the routing
    statistics; the default, the training file, makes that loss held-in. The POPE scores carry `correct`,
    1/0 per question (with the router shuffled too)."""
    model.eval()
    data = LlavaDataset(bundle.root / lm_file, bundle.root / "images", bundle.tokenizer, cfg.data.seq_len,
                        cfg.vision.num_image_tokens, ImageProcessor.from_config(cfg.vision),
                        template=stage_template(cfg, stage_idx, bundle.tokenizer))
    # the last records: the sampler may have reached the first ones less often
    idx = list(range(max(0, len(data) - num_samples), len(data)))
    batches = [data.collate([data[i] for i in idx[s:s + batch_size]]) for s in range(0, len(idx), batch_size)]
    layers = moe_layers(model)
    recorders = {i: _Recorder(max_tokens) for i, _ in layers}
    handles = []
    for i, layer in layers:
        layer.routing_hook = recorders[i]
        handles.append(layer.register_forward_pre_hook(recorders[i].input_hook))
    result = {"lm_loss": lm_loss(model, batches), "layers": {}}
    for i, layer in layers:
        layer.routing_hook = None
    for h in handles:
        h.remove()
    for i, layer in layers:
        result["layers"][str(i)] = _layer_report(layer, recorders[i])
    with shuffled_routers(model, shuffle_seed):
        result["lm_loss_router_shuffled"] = lm_loss(model, batches)
    if pope:
        device = next(model.parameters()).device
        result["pope"] = evaluate_pope(model, bundle, cfg, device, stage_idx=stage_idx, per_question=True)
        with shuffled_routers(model, shuffle_seed):
            result["pope_router_shuffled"] = evaluate_pope(model, bundle, cfg, device, stage_idx=stage_idx,
                                                           per_question=True)
        result["pope_f1_drop_under_shuffle"] = result["pope"]["f1"] - result["pope_router_shuffled"]["f1"]
        result["pope_acc_drop_under_shuffle"] = result["pope"]["accuracy"] - result["pope_router_shuffled"]["accuracy"]
    result["lm_loss_increase_under_shuffle"] = result["lm_loss_router_shuffled"] - result["lm_loss"]
    return result


def _layer_report(layer, rec: _Recorder) -> dict:
    E = layer.experts.num_experts
    logits, mod, choices = torch.cat(rec.logits), torch.cat(rec.modality), torch.cat(rec.choices)
    counter = M.RoutingCounter()
    counter.add(0, choices, mod, E)
    c = counter.counts[0]  # [M, E]
    out = {"num_tokens": {"image": int((mod == IMAGE).sum()), "text": int((mod == TEXT).sum())}}
    for m, name in ((IMAGE, "image"), (TEXT, "text")):
        sel = mod == m
        out[name] = {
            "load": M.load_fractions(c[m]).tolist(),
            "load_cv": M.load_cv(c[m]),
            "routing_entropy": M.routing_entropy(logits[sel].softmax(-1)),
        }
    out["all"] = {"load": M.load_fractions(c.sum(0)).tolist(), "load_cv": M.load_cv(c.sum(0)),
                  "routing_entropy": M.routing_entropy(logits.softmax(-1))}
    out["js_image_text"] = (M.js_divergence(c[IMAGE].double() + 1e-12, c[TEXT].double() + 1e-12)
                            if c[IMAGE].sum() and c[TEXT].sum() else None)
    w_up = layer.experts.w_up  # (every expert activation has w_up; only SwiGLU has w_gate)
    x = torch.cat(rec.inputs)[: rec.max_tokens].to(device=w_up.device, dtype=w_up.dtype)
    outs = every_expert_output(layer.experts, x).cpu()
    first_weight = w_up if layer.experts.w_gate is None else layer.experts.w_gate  # GELU: w_up; SwiGLU: w_gate
    out["expert_output_cosine"] = M.pairwise_output_cosine(outs)
    out["expert_output_cka"] = M.pairwise_cka(outs)
    out["expert_weight_cosine"] = M.pairwise_weight_cosine(first_weight.detach().cpu())
    out["output_cosine_matrix"] = [[float(F.cosine_similarity(outs[a].double(), outs[b].double(), dim=-1).mean())
                                    for b in range(E)] for a in range(E)]
    out["router_logits"] = {"image": logits[mod == IMAGE][:2000].tolist(), "text": logits[mod == TEXT][:2000].tolist()}
    return out
