"""Optimizer state only for what trains.

jaxft's TrainState keeps `trainable` and `frozen` as separate flat dicts and builds the optimizer
over `trainable` alone, so frozen leaves have no Adam moments and need no `optax.transforms.freeze`
or `partition`: they are not in the optimizer's tree at all. `optimizer_guard` checks that promise
on a live optimizer state. For users who keep one parameter tree instead, `masked_optimizer` gives
the equivalent with `optax.transforms.partition`: frozen leaves get `optax.set_to_zero()`, which
holds no state, and the inner optimizer's state holds `MaskedNode`s (no arrays) in their place.
"""

from __future__ import annotations

from typing import Mapping

import jax
import optax

from jaxft.peft.rules import FROZEN, LABELS, TRAINABLE


def _path_str(key_path) -> str:
  """A jax key path -> its dict keys '/'-joined (attribute and index entries are skipped)."""
  return "/".join(str(k.key) for k in key_path if isinstance(k, jax.tree_util.DictKey))


def masked_optimizer(tx: optax.GradientTransformation,
                     labels: Mapping[str, str]) -> optax.GradientTransformation:
  """tx for the trainable leaves, zero updates (and no state) for the frozen ones.

  labels: {path: "trainable" | "frozen"} as from `jaxft.peft.partition`. The returned
  transformation accepts a flat '/'-keyed dict or the nested tree; leaves are looked up by their
  '/'-joined path, and a leaf without a label is an error.
  """
  bad = sorted({v for v in labels.values()} - set(LABELS))
  if bad:
    raise ValueError(f"labels must be {LABELS}, got {bad}")

  def param_labels(params):
    def label(key_path, _):
      path = _path_str(key_path)
      if path not in labels:
        raise KeyError(f"parameter {path!r} has no PEFT label; partition the same parameters "
                       "the optimizer is built for")
      return labels[path]
    return jax.tree_util.tree_map_with_path(label, params)

  return optax.transforms.partition({TRAINABLE: tx, FROZEN: optax.set_to_zero()}, param_labels)


def optimizer_guard(opt_state, labels: Mapping[str, str]) -> int:
  """Raises if any array in `opt_state` belongs to a frozen parameter; returns how many state
  arrays belong to trainable ones. A state array belongs to parameter p when the dict keys on its
  path, '/'-joined, end with p (Adam's mu/nu are trees shaped like the parameters)."""
  frozen = {p for p, l in labels.items() if l == FROZEN}
  trainable = {p for p, l in labels.items() if l == TRAINABLE}

  def owner(path: str, names) -> str | None:
    parts = path.split("/")
    for i in range(len(parts)):
      tail = "/".join(parts[i:])
      if tail in names:
        return tail
    return None

  offenders, n = [], 0
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
    path = _path_str(key_path)
    if not path:
      continue
    if owner(path, frozen) is not None:
      offenders.append(f"{path} {getattr(leaf, 'shape', ())}")
    elif owner(path, trainable) is not None:
      n += 1
  if offenders:
    raise ValueError(f"the optimizer holds state for {len(offenders)} frozen parameter(s), e.g. "
                     f"{offenders[:3]}; build it over the trainable dict only (TrainState.create"
                     "(trainable, frozen, tx)) or wrap it with jaxft.peft.masked_optimizer")
  return n
