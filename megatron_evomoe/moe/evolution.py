"""Expert evolution (EvoMoE, ARCHITECTURE 4.2).

During stage II each MoE-designated layer trains one FFN (FFN1); N-1 evolved
experts are frozen buffers (no optimizer state) that follow FFN1 after every
optimizer step, each at a rate drawn fresh from its own beta range. At the
stage II -> III boundary `split_evolving_ffn` turns FFN1 and the evolved
tensors into the E experts of a MoE layer.

The paper prints its Eq. 1 as  theta_n <- beta * theta_1 + (1 - beta) * grad(theta_1),
which read literally mixes weights and gradients and contradicts its own text
("a larger beta emphasises historical data"; "beta = 0.9 retains only 10% of
updates per step"; beta = 0 equals expert 1). So the rule is a choice:

- ``scaled_update`` (default): theta_n <- theta_n + (1 - beta_n) * dtheta_1, where
  dtheta_1 is FFN1's change in this step. Evolved experts start equal to FFN1;
  beta = 0 reproduces FFN1 exactly; beta = 0.9 keeps 10% of each update. This is
  the reading that satisfies every sentence of the paper's text, hence the default.
- ``ema``: theta_n <- beta_n * theta_n + (1 - beta_n) * theta_1 (an exponential
  moving average of FFN1's trajectory; also gives FFN1 at beta = 0).
- ``literal``: theta_n <- beta_n * theta_1 + (1 - beta_n) * dtheta_1, the printed
  equation with grad(theta_1) taken as the step's update, for comparison.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import EvolutionConfig, check_choice
from ..model.llm import FFN
from .experts import dense_tensors


def evolve_(evolved: torch.Tensor, theta_new: torch.Tensor, theta_old: torch.Tensor,
            beta: torch.Tensor, rule: str) -> None:
    """Update evolved experts in place.

    evolved: [N, *w] (one slice per evolved expert); theta_new/theta_old: [*w]
    (FFN1 after/before the step); beta: [N].
    """
    b = beta.to(evolved.dtype).view(-1, *([1] * theta_new.dim()))  # [N, 1, ...]
    if rule == "scaled_update":
        evolved.add_((1 - b) * (theta_new - theta_old))
    elif rule == "ema":
        evolved.mul_(b).add_((1 - b) * theta_new)
    elif rule == "literal":
        evolved.copy_(b * theta_new + (1 - b) * (theta_new - theta_old))
    else:  # the choices are EvolutionConfig.rule's, checked by the config and EvolutionScheduler
        raise AssertionError(f"evolution.rule {rule!r} has no update rule")


class EvolvingFFN(FFN):
    """FFN1 (trainable, same parameter names as the dense FFN) plus frozen evolved copies.

    Forward is FFN1 alone (stage II runs the layer dense). The evolved tensors
    are buffers named `evolved_<key>` with shape [N-1, *t.shape], one per tensor of FFN1 by its
    expert key (experts.py::expert_keys: w_gate (SwiGLU only), w_up, w_down, and with
    model.mlp_bias b_gate, b_up, b_down: biases evolve like weights), so they are checkpointed with
    the model and never reach the optimizer.
    """

    def __init__(self, hidden: int, ffn_hidden: int, num_evolved: int, activation: str = "swiglu",
                 bias: bool = False):
        super().__init__(hidden, ffn_hidden, activation, bias)
        self.num_evolved = num_evolved
        for key, t in dense_tensors(self).items():
            self.register_buffer(f"evolved_{key}", torch.empty(num_evolved, *t.shape, dtype=t.dtype))

    @classmethod
    def from_ffn(cls, ffn: FFN, num_evolved: int) -> "EvolvingFFN":
        """Start of stage II: every evolved expert starts as a copy of FFN1."""
        w = ffn.w_up.weight
        new = cls(w.shape[1], w.shape[0], num_evolved, ffn.activation, ffn.w_up.bias is not None)
        new = new.to(device=w.device, dtype=w.dtype)
        new.load_state_dict(ffn.state_dict(), strict=False)
        with torch.no_grad():
            for key, t in dense_tensors(ffn).items():
                getattr(new, f"evolved_{key}").copy_(t.expand(num_evolved, *t.shape))
        return new

    def ffn1_weights(self) -> dict[str, torch.Tensor]:
        """FFN1's tensors (weights and biases) by expert key."""
        return dense_tensors(self)

    def expert_weights(self) -> list[dict[str, torch.Tensor]]:
        """[FFN1, evolved 1, ..., evolved N-1] as nn.Linear-layout tensors ([out, in] weights)."""
        out = [{k: v.detach() for k, v in self.ffn1_weights().items()}]
        for n in range(self.num_evolved):
            out.append({key: getattr(self, f"evolved_{key}")[n] for key in self.ffn1_weights()})
        return out


class EvolutionScheduler:
    """Applies the evolution rule to every EvolvingFFN after each optimizer step.

    Call `before_step()` just before `optimizer.step()` (it snapshots FFN1) and
    `after_step()` right after. Beta draws come from a dedicated generator whose
    state is checkpointed, so a resumed run evolves identically.
    """

    def __init__(self, modules: list[EvolvingFFN], beta_ranges: list, rule: str, seed: int):
        check_choice(EvolutionConfig, "rule", rule, "evolution.rule")
        for m in modules:
            assert m.num_evolved == len(beta_ranges), "one beta range per evolved expert"
        self.modules, self.rule = modules, rule
        ranges = torch.tensor(beta_ranges, dtype=torch.float64)  # [N, 2]
        self.low, self.high = ranges[:, 0], ranges[:, 1]
        self.generator = torch.Generator().manual_seed(seed)
        self._snapshot: list[dict[str, torch.Tensor]] | None = None
        self.last_betas: torch.Tensor | None = None

    def draw_betas(self) -> torch.Tensor:
        """One fresh beta per evolved expert, uniform in its range: [N]."""
        u = torch.rand(len(self.low), generator=self.generator, dtype=torch.float64)
        return self.low + (self.high - self.low) * u

    def before_step(self) -> None:
        self._snapshot = [{k: w.detach().clone() for k, w in m.ffn1_weights().items()} for m in self.modules]

    @torch.no_grad()
    def after_step(self) -> None:
        assert self._snapshot is not None, "before_step() must run before after_step()"
        # One draw per step shared by all layers: expert n follows FFN1 at rate
        # beta_n everywhere, so "expert n" is one consistent point along the path.
        betas = self.draw_betas()
        for m, old in zip(self.modules, self._snapshot):
            for name, w in m.ffn1_weights().items():
                evolve_(getattr(m, f"evolved_{name}"), w.detach(), old[name], betas, self.rule)
        self._snapshot, self.last_betas = None, betas

    def distances(self) -> list[list[float]]:
        """Per layer, relative distance ||theta_n - theta_1|| / ||theta_1|| of each evolved expert."""
        out = []
        for m in self.modules:
            ffn1 = torch.cat([w.detach().flatten() for w in m.ffn1_weights().values()])
            row = []
            for n in range(m.num_evolved):
                ev = torch.cat([getattr(m, f"evolved_{k}")[n].flatten() for k in m.ffn1_weights()])
                row.append(float((ev - ffn1).norm() / ffn1.norm().clamp_min(1e-12)))
            out.append(row)
        return out

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "rule": self.rule}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
