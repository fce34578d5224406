"""Regex rules that label every parameter "trainable" or "frozen", checked for exact coverage.

A parameter path is the '/'-joined key of the flat parameter dict
("backbone/encoder/layer_0/attention/self/query/lora_a"). A `Rule` matches a path when its pattern is
found in it (`re.search`) and none of its `exclude` patterns is. `label_params` applies a rule list
and insists that

  * every parameter is matched by at least one rule (no silent default),
  * no parameter is matched by two rules with different labels (rules are not ordered, so an
    overlap cannot hide behind first-match-wins); two rules with the same label may overlap,
    which is how combined methods take the union of their trainable sets,
  * every `required` rule matches at least one parameter (a typo in a regex, or a hook the model
    never called, is an error rather than a method that silently trains nothing).

All problems are collected and reported together, each naming the rules and parameters involved.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Mapping, Sequence

import jax
import numpy as np

TRAINABLE = "trainable"
FROZEN = "frozen"
LABELS = (TRAINABLE, FROZEN)

# Leaves that only the PEFT hooks of jaxft.models.peft_layers create. They are claimed only by the
# method that adds them, so a model built with a different PeftSpec than the config fails loudly.
PEFT_LEAF = (r"(^|/)(lora_a|lora_b|dora_m|ia3|prefix_key|prefix_value|prompt)$"
             r"|(^|/)adapter_(down|up)/")

_SHOW = 8  # how many example paths an error message lists


@dataclasses.dataclass(frozen=True)
class Rule:
  """name: shown in errors and tables. pattern: regex searched in the path. label: "trainable" or
  "frozen". exclude: regexes; a path matching any of them is not matched by this rule.
  required: a required rule that matches no parameter is an error. hint: how to fix that error.
  """

  name: str
  pattern: str
  label: str
  exclude: tuple[str, ...] = ()
  required: bool = True
  hint: str = ""

  def __post_init__(self):
    if self.label not in LABELS:
      raise ValueError(f"rule {self.name!r}: label must be one of {LABELS}, got {self.label!r}")
    for p in (self.pattern, *self.exclude):
      try:
        re.compile(p)
      except re.error as e:
        raise ValueError(f"rule {self.name!r}: invalid regex {p!r} ({e})") from None

  def matches(self, path: str) -> bool:
    return (re.search(self.pattern, path) is not None
            and not any(re.search(p, path) for p in self.exclude))

  def describe(self) -> str:
    out = f"{self.label:9s} {self.name:16s} {self.pattern}"
    if self.exclude:
      out += "  except  " + "  |  ".join(self.exclude)
    return out


def describe(rules: Sequence[Rule]) -> str:
  """A table of the rules, one per line (for logs and error messages)."""
  return "\n".join(r.describe() for r in rules)


def _examples(paths: Sequence[str]) -> str:
  shown = ", ".join(paths[:_SHOW])
  return shown + (f", ... ({len(paths) - _SHOW} more)" if len(paths) > _SHOW else "")


def label_params(flat: Mapping[str, object], rules: Sequence[Rule]) -> dict[str, str]:
  """flat params (path -> array) -> {path: "trainable" | "frozen"}; raises ValueError listing every
  uncovered parameter, every parameter matched by rules of different labels (naming both rules),
  and every required rule that matched nothing."""
  if not rules:
    raise ValueError("no partition rules given")
  names = [r.name for r in rules]
  if len(set(names)) != len(names):
    raise ValueError(f"partition rules need distinct names, got {names}")
  labels: dict[str, str] = {}
  hits = {r.name: 0 for r in rules}
  uncovered, conflicts = [], []
  for path in flat:
    matched = [r for r in rules if r.matches(path)]
    for r in matched:
      hits[r.name] += 1
    if not matched:
      uncovered.append(path)
      continue
    first = matched[0]
    other = next((r for r in matched[1:] if r.label != first.label), None)
    if other is not None:
      conflicts.append(f"{path} is matched by rule {first.name!r} ({first.label}, "
                       f"{first.pattern!r}) and by rule {other.name!r} ({other.label}, "
                       f"{other.pattern!r})")
      continue
    labels[path] = first.label
  errors = []
  if uncovered:
    errors.append(f"{len(uncovered)} parameter(s) matched by no rule: {_examples(uncovered)}. "
                  "Every parameter needs exactly one label; PEFT parameters (lora_a, lora_b, "
                  "dora_m, ia3, adapter_*, prefix_*, prompt) are claimed only by the method that "
                  "adds them, so build the model with peft.spec_from_config(config.peft).")
  if conflicts:
    more = f" ... ({len(conflicts) - _SHOW} more)" if len(conflicts) > _SHOW else ""
    errors.append("parameter(s) matched by rules with different labels:\n  "
                  + "\n  ".join(conflicts[:_SHOW]) + more)
  for r in rules:
    if r.required and hits[r.name] == 0:
      errors.append(f"rule {r.name!r} ({r.pattern!r}) matches no parameter."
                    + (f" {r.hint}" if r.hint else ""))
  if errors:
    raise ValueError("PEFT partition failed:\n- " + "\n- ".join(errors)
                     + "\nRules:\n" + describe(rules))
  return labels


def _size(x) -> int:
  shape = getattr(x, "shape", None)
  return int(np.prod(shape)) if shape is not None else int(np.size(x))


def count(flat: Mapping[str, object], labels: Mapping[str, str]) -> dict:
  """{"trainable_params": int, "total_params": int, "trainable_percent": float (0-100)}."""
  missing = sorted(set(flat) - set(labels))
  extra = sorted(set(labels) - set(flat))
  if missing or extra:
    raise ValueError(f"labels do not match the parameters: unlabeled {_examples(missing)}; "
                     f"labels without a parameter {_examples(extra)}")
  total = sum(_size(v) for v in flat.values())
  trainable = sum(_size(v) for k, v in flat.items() if labels[k] == TRAINABLE)
  return {"trainable_params": int(trainable), "total_params": int(total),
          "trainable_percent": 100.0 * trainable / total if total else 0.0}


def split(flat: Mapping[str, object], labels: Mapping[str, str]):
  """-> (trainable, frozen) flat dicts by label."""
  trainable = {k: v for k, v in flat.items() if labels[k] == TRAINABLE}
  frozen = {k: v for k, v in flat.items() if labels[k] != TRAINABLE}
  return trainable, frozen


def dense_paths(flat: Iterable[str]) -> list[str]:
  """Module paths that own a `kernel` (the Dense layers LoRA/IA3 targets can name)."""
  return sorted({p[: -len("/kernel")] for p in flat
                 if p.endswith("/kernel") and not re.search(PEFT_LEAF, p)})


def is_flat(params) -> bool:
  return isinstance(params, Mapping) and all(not isinstance(v, Mapping) for v in params.values())


def tree_size(tree) -> int:
  return int(sum(_size(x) for x in jax.tree_util.tree_leaves(tree)))
