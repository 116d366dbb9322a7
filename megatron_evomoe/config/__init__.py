"""Typed configuration tree, loaded from YAML with `--section.field=value` overrides.

Every value is type-checked and every cross-field rule is validated before any
work starts; errors are `ConfigError` (a ValueError) naming the offending field.

- schema.py: the section dataclasses; each choice field is a `Literal[...]`, the one place
  its allowed values are listed (`field_choices` / `check_choice` read them);
- loading.py: YAML + overrides -> typed dataclasses (`load_config`, `_from_dict`);
- yaml_text.py: strict YAML parsing (UTF-8, no key set twice, one-line errors);
- validation.py: the cross-field rules (`validate`, `moe_layer_indices`);
- global_batch.py: each stage's global batch and the accumulation it implies for a layout.
"""
from .global_batch import accumulation_steps, check_global_batches, stage_global_batch
from .loading import _from_dict, load_config, upgrade_saved_config
from .schema import (Config, ConfigError, DataConfig, EvolutionConfig, ModelConfig, MoEConfig, ParallelConfig,
                     RouterConfig, StageConfig, TrainConfig, VisionConfig, check_choice, field_choices)
from .validation import moe_layer_indices, validate

__all__ = ["Config", "ConfigError", "DataConfig", "EvolutionConfig", "ModelConfig", "MoEConfig", "ParallelConfig",
           "RouterConfig", "StageConfig", "TrainConfig", "VisionConfig", "check_choice", "field_choices",
           "load_config", "moe_layer_indices", "validate", "_from_dict", "accumulation_steps",
           "check_global_batches", "stage_global_batch", "upgrade_saved_config"]
