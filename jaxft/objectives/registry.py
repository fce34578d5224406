"""Objectives by name: `config.objective.name` -> the loss terms and extras a step needs.

An objective factory takes (options, task_info) and returns an `Objective`, where `options` is
`config.objective.<name>`: the objective's own ConfigDict, filled from the `defaults` it registered
(so `--config.objective.fgm.epsilon=0.01` is a checked override). The training loop turns the
Objective into a step with `jaxft.objectives.base.make_step`. Adding an objective is one module with
a factory decorated by `@register("name", defaults={...})` (see README "Adding an objective").
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Callable, Mapping

from jaxft.objectives.base import Weighted

_REGISTRY: dict[str, Callable[..., "Objective"]] = {}
_DEFAULTS: dict[str, dict] = {}


@dataclasses.dataclass
class Objective:
  """terms: name -> Weighted loss term.
  init_extras(trainable, frozen) -> dict: state extras created at init (e.g. an EMA teacher copy).
  update_extras(old_state, new_state, metrics) -> dict: called after each update inside the step.
  unlabeled: True if batches must carry an unlabeled part (keys prefixed "unlabeled/").
  """

  terms: Mapping[str, Weighted]
  init_extras: Callable[[Any, Any], dict] | None = None
  update_extras: Callable[..., dict] | None = None
  unlabeled: bool = False


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


def _import_all():
  # Objective modules register themselves on import; a missing optional one is not an error.
  import importlib
  for mod in ("supervised", "adversarial", "consistency", "rdrop"):
    try:
      importlib.import_module(f"jaxft.objectives.{mod}")
    except ModuleNotFoundError as e:
      if e.name != f"jaxft.objectives.{mod}":
        raise
