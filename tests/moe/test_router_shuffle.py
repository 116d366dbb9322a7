import torch

from megatron_evomoe.moe.experts import GroupedExperts
from megatron_evomoe.moe.moe_layer import MoELayer
from megatron_evomoe.moe.router import TopKRouter
from megatron_evomoe.moe.router_shuffle import shuffled_routers


def test_router_shuffle_changes_routing_and_nothing_else():
    torch.manual_seed(0)
    layer = MoELayer(TopKRouter(8, 4, 2, backend="torch", init_std=1.0),
                     GroupedExperts(4, 8, 8, backend="torch", init_std=0.3))
    x, mod = torch.randn(40, 8), torch.zeros(40, dtype=torch.long)
    seen = []
    layer.routing_hook = lambda l, r, m: seen.append(r)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    y, _ = layer(x, mod)
    with shuffled_routers(layer, seed=1):
        y_shuffled, _ = layer(x, mod)
    y_again, _ = layer(x, mod)
    plain, shuffled, again = seen
    assert (plain.topk_idx != shuffled.topk_idx).any()  # routing changed
    assert torch.equal(plain.gates, shuffled.gates) and torch.equal(plain.logits, shuffled.logits)
    assert (shuffled.topk_idx[:, 0] != shuffled.topk_idx[:, 1]).all()  # k choices stay distinct
    assert int(shuffled.tokens_per_expert.sum()) == 80
    assert not torch.allclose(y, y_shuffled)
    assert torch.equal(y, y_again) and torch.equal(plain.topk_idx, again.topk_idx)  # hooks removed
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k
