"""Routers: DTR equals its materialised-weights definition, reads the modality flag, and the variants."""
import torch
import torch.nn.functional as F

from megatron_evomoe.model.modality import IMAGE, TEXT
from megatron_evomoe.moe.dtr import DynamicTokenRouter
from megatron_evomoe.moe.router import PerModalityLinearRouter, TopKRouter


def materialised_dtr_logits(r: DynamicTokenRouter, z, mod):
    """ARCHITECTURE 4.3 written literally: generate Theta_down/Theta_up per token, then apply them."""
    out = []
    for t in range(z.shape[0]):
        m = mod[t]
        h = r.w1[m] @ z[t] + r.b1[m]  # [H]
        theta_down = torch.einsum("j,joc->oc", h, r.w2_down[m]) + r.b2_down[m]  # [2R, C]
        theta_up = torch.einsum("j,jdr->dr", h, r.w2_up[m]) + r.b2_up[m]  # [D, R]
        u = theta_down @ z[t]
        R = u.shape[0] // 2
        e = theta_up @ (F.silu(u[:R]) * u[R:])
        out.append(r.phi_w @ e + r.phi_b)
    return torch.stack(out)


def test_dtr_bilinear_equals_materialised_weights():
    torch.manual_seed(0)
    r = DynamicTokenRouter(24, 4, 1, hyper_hidden=6, rank=3, embed_dim=5, backend="torch")
    z = torch.randn(11, 24)
    mod = torch.tensor([TEXT, IMAGE] * 5 + [IMAGE])
    out = r(z, mod)
    torch.testing.assert_close(out.logits, materialised_dtr_logits(r, z, mod), atol=1e-5, rtol=1e-4)
    assert out.topk_idx.shape == (11, 1) and int(out.tokens_per_expert.sum()) == 11


def test_dtr_routing_changes_with_only_the_modality_flag():
    torch.manual_seed(1)
    r = DynamicTokenRouter(32, 4, 1, hyper_hidden=8, rank=4, embed_dim=8, backend="torch")
    z = torch.randn(64, 32)
    text = torch.full((64,), TEXT)
    a = r(z, text)
    flipped = text.clone()
    flipped[5] = IMAGE
    b = r(z, flipped)
    changed = (a.logits - b.logits).abs().amax(-1) > 1e-6
    assert changed.tolist() == [t == 5 for t in range(64)]  # that token only
    # over many tokens the two modalities pick experts differently
    c = r(z, torch.full((64,), IMAGE))
    assert (c.topk_idx != a.topk_idx).any()


def test_dtr_gradients_reach_both_hypernetworks_and_phi():
    torch.manual_seed(2)
    r = DynamicTokenRouter(16, 4, 2, hyper_hidden=4, rank=2, embed_dim=4, backend="torch")
    z = torch.randn(20, 16)
    mod = torch.tensor([TEXT] * 10 + [IMAGE] * 10)
    out = r(z, mod)
    (out.gates.sum() + out.aux_loss).backward()
    for name, p in r.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert r.w1.grad[TEXT].abs().sum() > 0 and r.w1.grad[IMAGE].abs().sum() > 0


def test_per_modality_linear_router_selects_the_modality_weights():
    torch.manual_seed(3)
    r = PerModalityLinearRouter(8, 3, 1, backend="torch")
    z = torch.randn(5, 8)
    mod = torch.tensor([TEXT, IMAGE, IMAGE, TEXT, IMAGE])
    expected = torch.stack([r.weight[m] @ z[t] for t, m in enumerate(mod)])
    torch.testing.assert_close(r.compute_logits(z, mod), expected)


def test_topk_router_renormalises_gates():
    torch.manual_seed(4)
    r = TopKRouter(8, 4, 2, backend="torch", init_std=1.0)
    out = r(torch.randn(9, 8), torch.zeros(9, dtype=torch.long))
    torch.testing.assert_close(out.gates.sum(-1), torch.ones(9))
    torch.testing.assert_close(out.probs.gather(1, out.topk_idx) / out.probs.gather(1, out.topk_idx).sum(-1, keepdim=True),
                               out.gates)
