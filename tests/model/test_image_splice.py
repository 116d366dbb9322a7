"""model/mllm.py::splice_rows, the static-shape image splice: exactly masked_scatter, values and gradients."""
import torch

from megatron_evomoe.model.mllm import splice_rows


def test_splice_rows_is_masked_scatter_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(3, 7, 5, generator=gen, requires_grad=True)
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[0, 1:4] = mask[2, 0] = mask[2, 6] = True  # 5 slots, one sample without any
    rows = torch.randn(5, 5, generator=gen, requires_grad=True)
    out = splice_rows(h, mask, rows)
    ref = h.masked_scatter(mask.unsqueeze(-1), rows)
    assert torch.equal(out, ref)
    assert torch.equal(out[2, 6], rows[4]) and torch.equal(out[1], h[1])  # in order; untouched elsewhere
    g = torch.randn(3, 7, 5, generator=gen)
    grads = torch.autograd.grad(out, (h, rows), g)
    ref_grads = torch.autograd.grad(ref, (h, rows), g)
    for a, b in zip(grads, ref_grads):
        assert torch.equal(a, b)
