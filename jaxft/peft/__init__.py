"""Parameter-efficient fine-tuning as parameter partitioning.

A PEFT method is (1) the parameters its hooks add to the model (`PeftSpec`, built from `config.peft`
by `spec_from_config`; the hooks are `jaxft.models.peft_layers`, where the model ports build with
them) and (2) regex rules saying which parameters train (`methods.rules_for`); `partition` labels
every parameter "trainable" or "frozen" and checks that the rules cover each one exactly once. The
train state keeps the two parts in separate flat dicts, so the optimizer (and its moments) only ever
see the trainable part.

    spec = peft.spec_from_config(config.peft)                       # -> PeftSpec for the model
    labels = peft.partition(config.peft, flat_params, num_layers)   # path -> trainable | frozen
    counts = peft.count(flat_params, labels)                        # trainable / total / percent
    merged = peft.merge(params, spec)                               # LoRA/DoRA/IA3 folded in
    rate = peft.method_learning_rate(config.peft, "lora")           # peft.learning_rate or default
    peft.export(model, params, out_dir, merged=True)                # HF dir, or the small part
"""

from __future__ import annotations

from typing import Mapping

from jaxft.peft.io import (Trainable, apply_trainable, export, load_adapter, load_trainable,
                           model_spec, peft_part, save_trainable)
from jaxft.models.peft_layers import PeftSpec
from jaxft.peft.merge import init_dora, init_pissa, merge, peft_leaf_paths, unmergeable_paths
from jaxft.peft.methods import (LORA_TARGETS, METHODS, check_layers, lora_targets,
                                method_learning_rate, parse_method, rules_for, spec_from_config)
from jaxft.peft.optim import masked_optimizer, optimizer_guard
from jaxft.peft.rules import FROZEN, TRAINABLE, Rule, count, describe, label_params, split
from jaxft.core.state import flatten

__all__ = [
    "FROZEN", "LORA_TARGETS", "METHODS", "PeftSpec", "Rule", "TRAINABLE", "Trainable",
    "apply_trainable", "count", "describe", "export", "init_dora", "init_pissa", "label_params",
    "load_adapter", "load_trainable", "lora_targets", "masked_optimizer", "merge",
    "method_learning_rate",
    "model_spec", "optimizer_guard", "parse_method", "partition",
    "peft_leaf_paths", "peft_part", "rules_for", "save_trainable", "spec_from_config", "split",
    "unmergeable_paths",
]


def partition(cfg, flat_params, num_layers: int) -> dict[str, str]:
  """config.peft + flat params (path -> array; a nested tree is flattened) -> {path: "trainable" |
  "frozen"}. Raises ValueError for an uncovered parameter, a parameter matched by a trainable and
  a frozen rule, or a method rule that matches nothing (e.g. lora_targets naming no module)."""
  flat = flat_params
  if any(isinstance(v, Mapping) for v in flat.values()):
    flat = flatten(flat)
  if "freeze_bottom" in parse_method(cfg.method):
    check_layers(flat, num_layers)
  return label_params(flat, rules_for(cfg, num_layers))
