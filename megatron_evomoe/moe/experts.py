"""GroupedExperts: E experts with stacked weights, computed by grouped matmuls.

The experts are the dense FFN they are made from (model/llm.py::FFN), E times:
- ``swiglu``: w_down(silu(x w_gate) * (x w_up));
- ``gelu_tanh`` (Phi's fc1 -> gelu_new -> fc2): w_down(gelu_tanh(x w_up)); there is no w_gate.
With ``bias`` (``model.mlp_bias``) every expert linear has a per-expert bias (b_gate, b_up: [E, F];
b_down: [E, C]), added to each row by the expert that owns the row.

Tokens arrive sorted by expert (the dispatcher's job) with per-expert counts;
expert e owns rows [offsets[e-1], offsets[e]). Weights are stored as [E, in, out]
so that each expert's product is X_e @ W[e], the layout grouped-GEMM kernels use.
Every backend runs the same three (two for GELU) grouped_mm calls; only the activation and the
bias adds around them depend on the options.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, check_choice
from ..model.recompute import recomputed
from ..ops.grouped_gemm import grouped_mm

# Which linear of the dense FFN each expert tensor comes from, and which of its tensors:
# expert key -> (FFN linear, "weight" | "bias"). Weights are [out, in] there and [in, out] here.
FFN_SOURCE = {"w_gate": ("w_gate", "weight"), "w_up": ("w_up", "weight"), "w_down": ("w_down", "weight"),
              "b_gate": ("w_gate", "bias"), "b_up": ("w_up", "bias"), "b_down": ("w_down", "bias")}


def expert_keys(activation: str, bias: bool) -> tuple[str, ...]:
    """The expert tensors of an FFN with this activation and bias option, weights first."""
    linears = ("w_gate", "w_up", "w_down") if activation == "swiglu" else ("w_up", "w_down")
    return linears + (tuple("b_" + name[2:] for name in linears) if bias else ())


def dense_tensors(ffn) -> dict[str, torch.Tensor]:
    """A dense FFN's (model/llm.py::FFN) tensors by expert key, in nn.Linear layout (not detached)."""
    keys = expert_keys(ffn.activation, ffn.w_up.bias is not None)
    return {k: getattr(getattr(ffn, FFN_SOURCE[k][0]), FFN_SOURCE[k][1]) for k in keys}


def is_weight_matrix(name: str, p: torch.Tensor) -> bool:
    """Whether weight decay applies to parameter `name`: a matrix (a stacked bank of expert matrices
    too), not a norm gain or a bias. The experts' stacked biases [E, D] are 2-D but E biases, so they
    are no more decayed than the dense FFN's biases they were made from."""
    parts = name.split(".")
    expert_bias = parts[-1] in ("b_gate", "b_up", "b_down") and (len(parts) == 1 or parts[-2] == "experts")
    return p.dim() >= 2 and not expert_bias


def intermediate_dim(key: str, stacked: bool) -> int | None:
    """The dim of the intermediate width F in a tensor (what TP splits and drop-upcycling re-draws),
    None if it has none (b_down). stacked: the experts' [E, in, out] / [E, out] layout; else the dense
    FFN's (nn.Linear [out, in], bias [out])."""
    if key == "b_down":
        return None
    if key == "w_down":
        return 1  # [E, F, C] / [C, F]
    if not stacked:
        return 0  # [F, C] / [F]
    return 2 if key.startswith("w_") else 1  # [E, C, F] / [E, F]


class GroupedExperts(nn.Module):
    def __init__(self, num_experts: int, hidden: int, ffn_hidden: int, backend: str = "auto",
                 init_std: float = 0.02, activation: str = "swiglu", bias: bool = False):
        super().__init__()
        check_choice(ModelConfig, "ffn_activation", activation, "model.ffn_activation")  # the FFN's
        self.backend, self.activation = backend, activation
        self.recompute_hidden = False  # train.recompute=selective (model/recompute.py)
        E, C, Fh = num_experts, hidden, ffn_hidden
        shapes = {"w_gate": (E, C, Fh), "w_up": (E, C, Fh), "w_down": (E, Fh, C),
                  "b_gate": (E, Fh), "b_up": (E, Fh), "b_down": (E, C)}
        for key in expert_keys(activation, bias):
            init = torch.randn(shapes[key]) * init_std if key.startswith("w_") else torch.zeros(shapes[key])
            setattr(self, key, nn.Parameter(init))
        for key in set(FFN_SOURCE) - set(expert_keys(activation, bias)):  # absent: None, no parameter
            self.register_parameter(key, None)

    @property
    def num_experts(self) -> int:
        return self.w_up.shape[0]

    @property
    def tensor_keys(self) -> tuple[str, ...]:
        """This bank's tensors (parameter names)."""
        return expert_keys(self.activation, self.b_up is not None)

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """x: [N, C] sorted by expert; tokens_per_expert: [E] -> [N, C].

        No host read here: the offsets stay on the device and grouped_mm is an opaque custom op
        under torch.compile, whatever its backend (the PyTorch one runs torch._grouped_mm with
        the offsets, or, where this build refuses it, its per-expert loop inside the op). Only the
        'loop' reference reads the counts on the host (tests; train.compile refuses it)."""
        return self.add_down_bias(self.partial_output(x, tokens_per_expert), tokens_per_expert)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in self.tensor_keys}

    def partial_output(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """Everything but b_down: [N, C] -> [N, C]. Under TP this is a rank's partial sum over its F
        slice, so b_down is added once, after the sum (add_down_bias)."""
        if self.backend == "loop":
            no_down_bias = {k: v for k, v in self.tensors().items() if k != "b_down"}
            return experts_loop_reference(x, tokens_per_expert, no_down_bias, self.activation)
        offsets = _offsets(tokens_per_expert)
        h = recomputed(self._hidden, x, offsets) if self.recompute_hidden else self._hidden(x, offsets)  # [N, F]
        return grouped_mm(h, self.w_down, offsets, backend=self.backend)  # [N, C]

    def _hidden(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """The up half: [N, C] -> the activated [N, F] (recomputed in backward under selective recompute)."""
        owner = row_owner(offsets, x.shape[0]) if self.b_up is not None else None
        up = self._add_bias(grouped_mm(x, self.w_up, offsets, backend=self.backend), self.b_up, owner)  # [N, F]
        if self.activation == "gelu_tanh":
            return F.gelu(up, approximate="tanh")
        gate = self._add_bias(grouped_mm(x, self.w_gate, offsets, backend=self.backend), self.b_gate, owner)
        return F.silu(gate) * up

    def add_down_bias(self, y: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        if self.b_down is None:
            return y
        return self._add_bias(y, self.b_down, row_owner(_offsets(tokens_per_expert), y.shape[0]))

    @staticmethod
    def _add_bias(y: torch.Tensor, b: torch.Tensor | None, owner: torch.Tensor | None) -> torch.Tensor:
        # b: [E, D]; the pad row E is zero: rows past offsets[-1] belong to no expert
        return y if b is None else y + F.embedding(owner, F.pad(b, (0, 0, 0, 1))).to(y.dtype)

    @torch.no_grad()
    def load_from_ffns(self, weights: list[dict]) -> None:
        """Fill expert e from a dense FFN's tensors (nn.Linear layout: weights [out, in]), keyed by
        this bank's keys (upcycling.py::dense_tensors)."""
        assert len(weights) == self.num_experts
        for e, w in enumerate(weights):
            assert set(w) == set(self.tensor_keys), f"expert {e}: tensors {sorted(w)}, the bank has {self.tensor_keys}"
            for k in self.tensor_keys:
                getattr(self, k)[e].copy_(w[k].t() if k.startswith("w_") else w[k])


def _offsets(tokens_per_expert: torch.Tensor) -> torch.Tensor:
    return tokens_per_expert.cumsum(0).to(torch.int32)  # [E] end row of each expert


def row_owner(offsets: torch.Tensor, num_rows: int) -> torch.Tensor:
    """offsets: [E] end rows -> [num_rows] the expert owning each row, E for rows at or past offsets[-1]
    (they belong to no expert). On the device: no host sync."""
    rows = torch.arange(num_rows, device=offsets.device, dtype=offsets.dtype)
    return torch.searchsorted(offsets, rows, right=True)


def every_expert_output(experts: GroupedExperts, x: torch.Tensor) -> torch.Tensor:
    """Every expert applied to the same tokens (analytics): x [T, C] -> [E, T, C]."""
    E, T = experts.num_experts, x.shape[0]
    counts = torch.full((E,), T, dtype=torch.long)
    return experts_loop_reference(x.repeat(E, 1), counts, experts.tensors(), experts.activation).view(E, T, -1)


def experts_loop_reference(x, tokens_per_expert, tensors: dict, activation: str = "swiglu"):
    """The dumb loop: one dense FFN per non-empty expert. Used by tests and `backend='loop'`.
    tensors: the bank's tensors by key ([E, in, out] weights, [E, out] biases)."""
    t = {k: tensors.get(k) for k in FFN_SOURCE}
    out = x.new_zeros(x.shape[0], t["w_down"].shape[-1])
    start = 0
    for e, n in enumerate(tokens_per_expert.tolist()):
        if n:
            xe = x[start:start + n]
            up = _linear(xe, t["w_up"][e], t["b_up"], e)
            if activation == "gelu_tanh":
                h = F.gelu(up, approximate="tanh")
            else:
                h = F.silu(_linear(xe, t["w_gate"][e], t["b_gate"], e)) * up
            out[start:start + n] = _linear(h, t["w_down"][e], t["b_down"], e)
        start += n
    return out


def _linear(x, w, b, e):
    return x @ w if b is None else x @ w + b[e]
