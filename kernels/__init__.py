"""Triton kernels (installed as megatron_evomoe.kernels), one file per kernel with its PyTorch reference."""
