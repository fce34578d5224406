"""The train state: a small pytree. Parameters are flat dicts keyed by '/'-joined paths.

Flat paths ("backbone/encoder/layer_0/attention/query/kernel") make the trainable/frozen partition a
plain dict split, let PEFT rules be regexes over keys, and keep optimizer state only for what
trains. `merge_params` rebuilds the nested tree the Flax module expects.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

Flat = dict[str, jax.Array]


def flatten(params) -> Flat:
  return traverse_util.flatten_dict(params, sep="/")


def unflatten(flat: Flat):
  return traverse_util.unflatten_dict(flat, sep="/")


def split_params(params, is_trainable: Callable[[str], bool]) -> tuple[Flat, Flat]:
  """Nested params -> (trainable, frozen) flat dicts, by a predicate on the path."""
  flat = flatten(params)
  trainable = {k: v for k, v in flat.items() if is_trainable(k)}
  frozen = {k: v for k, v in flat.items() if not is_trainable(k)}
  return trainable, frozen


def merge_params(trainable: Flat, frozen: Flat):
  """(trainable, frozen) -> the nested parameter tree for `module.apply`."""
  return unflatten({**frozen, **trainable})


@flax.struct.dataclass
class TrainState:
  """step: int32 scalar. trainable/frozen: flat param dicts (gradients are taken of `trainable` only).
  opt_state: optimizer state of `trainable` alone. extras: objective-specific pytrees (EMA/teacher
  params, pruning masks and scores, SWA averages, skip counters), a dict keyed by name.
  """

  step: jax.Array
  trainable: Flat
  frozen: Flat
  opt_state: Any
  extras: dict = flax.struct.field(default_factory=dict)

  @property
  def params(self):
    return merge_params(self.trainable, self.frozen)

  @classmethod
  def create(cls, trainable: Flat, frozen: Flat, tx: optax.GradientTransformation, extras=None):
    # skipped_steps is always present so the pytree structure never changes between steps.
    extras = {"skipped_steps": jnp.zeros((), jnp.int32), **(extras or {})}
    return cls(step=jnp.zeros((), jnp.int32), trainable=trainable, frozen=frozen,
               opt_state=tx.init(trainable), extras=extras)


def count_params(flat: Flat) -> int:
  return int(sum(v.size for v in jax.tree_util.tree_leaves(flat)))
