"""megatron_evomoe: Megatron-style training of multimodal MoE LLMs with EvoMoE."""
__version__ = "0.1.0"
