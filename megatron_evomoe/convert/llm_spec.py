"""`LLMSpec`: what a Hugging Face decoder's config means for our config (model / moe / router).

Filled by the family readers (hf_llm.py, hf_qwen.py) and consumed by the weight maps, the
import (llava.py) and the export (export.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Tuple


@dataclass
class LLMSpec:
    """What an HF LLM config means for our config (model / moe / router sections)."""
    family: str  # llama | qwen2 | mixtral | qwen2_moe | phi | stablelm | qwen (mistral maps to llama)
    model: dict  # ModelConfig fields
    moe_layers: List[int] = field(default_factory=list)
    num_experts: int = 1
    top_k: int = 1
    renormalize: bool = True
    shared_expert_size: int = 0  # Qwen2-MoE's shared_expert_intermediate_size
    notes: List[str] = field(default_factory=list)
    ignorable: Tuple[str, ...] = ()  # fnmatch patterns of HF tensors that may stay unread

    @property
    def is_moe(self) -> bool:
        return bool(self.moe_layers)
