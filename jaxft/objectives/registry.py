"""Objectives by name: `config.objective.name` -> the loss terms and extras a step needs.

An objective factory takes (options, task_info) and returns an `Objective`, where `options` is
`config.objective.<name>`: the objective's own ConfigDict, filled from the `defaults` it registered
(so `--config.objective.fgm.epsilon=0.01` is a checked override). The step builder
(jaxft.train.build) composes the Objective with the run's other parts into one step. Adding an
objective is one module with a factory decorated by `@register("name", defaults={...})`, plus its
module name in `_MODULES` (see README "Adding an objective"); an objective defined outside the
package registers the same way once its module is imported.
"""

from __future__ import annotations

import difflib
from typing import Callable

from jaxft.core.part import Part

_REGISTRY: dict[str, Callable[..., "Objective"]] = {}
_DEFAULTS: dict[str, dict] = {}


# An objective is a Part (jaxft.core.part) that brings loss terms (and, for Mean Teacher or SMART,
# the extras its teacher keeps); `unlabeled` says its batches carry an unlabeled part.
Objective = Part


def register(name: str, defaults: dict | None = None):
  """Registers `factory(options, task_info) -> Objective` under `name` with its default options."""
  def deco(factory):
    if name in _REGISTRY:
      raise ValueError(f"objective {name!r} registered twice")
    _REGISTRY[name] = factory
    _DEFAULTS[name] = dict(defaults or {})
    return factory
  return deco


def defaults() -> dict[str, dict]:
  """name -> default options of every registered objective (the config builder nests these)."""
  _import_all()
  return {k: dict(v) for k, v in _DEFAULTS.items()}


def names() -> list[str]:
  _import_all()
  return sorted(_REGISTRY)


def build(objective_config, task_info) -> Objective:
  _import_all()
  name = objective_config.name
  if name not in _REGISTRY:
    close = difflib.get_close_matches(name, _REGISTRY, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise KeyError(f"unknown objective {name!r}.{hint} Known objectives: {', '.join(names())}")
  return _REGISTRY[name](objective_config[name], task_info)


_MODULES = ("supervised", "adversarial", "consistency", "adaptive", "rdrop", "contrastive")


def _import_all():
  # Objective modules register themselves on import; a missing optional one is not an error.
  import importlib
  for mod in _MODULES:
    try:
      importlib.import_module(f"jaxft.objectives.{mod}")
    except ModuleNotFoundError as e:
      if e.name != f"jaxft.objectives.{mod}":
        raise
