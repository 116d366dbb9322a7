"""Analytics on hand-made inputs with known answers."""
import math

import torch

from megatron_evomoe.moe import metrics as M


def test_load_and_cv():
    assert M.load_fractions(torch.tensor([1, 3])).tolist() == [0.25, 0.75]
    assert M.load_cv(torch.tensor([5, 5, 5, 5])) == 0.0
    # counts [0, 4]: mean 2, population std 2 -> CV 1
    assert abs(M.load_cv(torch.tensor([0, 4])) - 1.0) < 1e-12


def test_entropy_and_js():
    assert abs(M.routing_entropy(torch.full((3, 4), 0.25)) - math.log(4)) < 1e-12
    assert M.routing_entropy(torch.tensor([[1.0, 0.0]])) == 0.0
    assert abs(M.js_divergence(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])) - 1.0) < 1e-12
    assert abs(M.js_divergence(torch.tensor([0.3, 0.7]), torch.tensor([3.0, 7.0]))) < 1e-12
    # p = [1, 0], q = [1/2, 1/2]: m = [3/4, 1/4]; JS = H(m) - H(q)/2 in bits
    h = lambda *ps: -sum(p * math.log2(p) for p in ps if p)
    expected = h(0.75, 0.25) - 0.5 * h(0.5, 0.5)
    assert abs(M.js_divergence(torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5])) - expected) < 1e-12


def test_output_similarity_and_cka():
    torch.manual_seed(0)
    y = torch.randn(50, 6)
    same = torch.stack([y, y, y])
    assert abs(M.pairwise_output_cosine(same) - 1.0) < 1e-9 and abs(M.pairwise_cka(same) - 1.0) < 1e-9
    opposite = torch.stack([y, -y])
    assert abs(M.pairwise_output_cosine(opposite) + 1.0) < 1e-9
    # CKA is invariant to orthogonal transforms and isotropic scaling, cosine is not
    q, _ = torch.linalg.qr(torch.randn(6, 6))
    assert abs(M.linear_cka(y, 3.0 * y @ q) - 1.0) < 1e-9
    assert M.pairwise_output_cosine(torch.stack([y, y @ q])) < 0.9
    # independent representations have low CKA
    assert M.linear_cka(torch.randn(2000, 4), torch.randn(2000, 4)) < 0.02


def test_weight_cosine_is_misleading_under_permutation():
    # permuting an expert's hidden units leaves its function unchanged but its weight cosine drops
    torch.manual_seed(0)
    w = torch.randn(8, 16)
    perm = torch.randperm(16)
    assert M.pairwise_weight_cosine(torch.stack([w, w[:, perm]])) < 0.5


def test_routing_counter_per_modality():
    c = M.RoutingCounter()
    c.add(3, torch.tensor([[0], [1], [1], [2]]), torch.tensor([0, 1, 1, 0]), num_experts=3)
    c.add(3, torch.tensor([[2]]), torch.tensor([1]), num_experts=3)
    assert c.counts[3].tolist() == [[1, 0, 1], [0, 2, 1]]
