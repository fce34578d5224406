"""R-Drop (Liang et al. 2021, "R-Drop: Regularized Dropout for Neural Networks"), the worked example
of README "Adding an objective".

Two forward passes of the same batch differ only in their dropout masks, giving P1 and P2. Eq. (3):
  L = CE(P1, y) + CE(P2, y) + alpha * 1/2 [KL(P1 || P2) + KL(P2 || P1)]
averaged over real examples (sequence classification, logits [B, C]) or labeled tokens (token
classification, logits [B, S, C], labels -100 ignored). A packed batch (jaxft.data.packing) is
stacked with its slots renumbered (base.concat_batches), so logits are [2E, C] or [2R, L, C].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxft.objectives.base import (StepContext, Weighted, concat_batches, example_weights,
                                   token_weights)
from jaxft.objectives.registry import Objective, register
from jaxft.objectives.supervised import IGNORE, cross_entropy, masked_mean


def symmetric_kl(logits_a: jax.Array, logits_b: jax.Array) -> jax.Array:
  """[...]: 1/2 [KL(Pa || Pb) + KL(Pb || Pa)] = 1/2 sum_c (Pa_c - Pb_c)(log Pa_c - log Pb_c)."""
  la = jax.nn.log_softmax(logits_a.astype(jnp.float32), -1)
  lb = jax.nn.log_softmax(logits_b.astype(jnp.float32), -1)
  return 0.5 * jnp.sum((jnp.exp(la) - jnp.exp(lb)) * (la - lb), -1)


def rdrop_term(alpha: float, label_smoothing: float = 0.0):
  def term(apply_fn, params, batch, rng, ctx: StepContext):
    # One forward of the batch stacked on itself: rows b and B + b get independent dropout masks.
    twice = concat_batches(batch, batch)
    logits1, logits2 = jnp.split(apply_fn(params, twice, rng=rng, deterministic=False).logits, 2)
    labels, weights = batch["labels"], example_weights(batch)
    if labels.ndim == 2:  # token classification: score labeled tokens only
      weights = token_weights(batch, labels)
      labels = jnp.where(labels == IGNORE, 0, labels)
    ce = (cross_entropy(logits1, labels, label_smoothing)
          + cross_entropy(logits2, labels, label_smoothing))
    kl = symmetric_kl(logits1, logits2)
    return masked_mean(ce + alpha * kl, weights), {"ce": masked_mean(ce, weights) / 2,
                                                   "kl": masked_mean(kl, weights)}
  return term


@register("rdrop", defaults={"alpha": 1.0, "label_smoothing": 0.0})
def rdrop(options, info) -> Objective:
  if info.kind not in ("classification", "token_classification"):
    raise ValueError(f"objective 'rdrop' needs a classification task, got {info.kind!r}")
  if options.alpha < 0:
    raise ValueError(f"objective.rdrop.alpha must be >= 0, got {options.alpha}")
  return Objective(terms={"rdrop": Weighted(rdrop_term(options.alpha, options.label_smoothing))})
