"""Kernel outputs that start as garbage, so a test sees any element a kernel forgets to write."""
import torch


def poisoned_empty(*shape, **kwargs):
    """torch.empty filled with NaN (floats) or -7 (ints)."""
    t = torch.empty(*shape, **kwargs)
    return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-7)
