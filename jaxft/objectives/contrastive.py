"""Supervised contrastive fine-tuning for few labels: cross-entropy plus a contrastive term on the
pooled sentence embeddings, one forward pass.

Gunel et al. 2021 ("Supervised Contrastive Learning for Pre-trained Language Model Fine-tuning",
Eq. 1-2), loss="supcon": with z_i = pooled_i / ||pooled_i|| over the batch's N real examples,
  L_SCL = sum_i -1/(N_yi - 1) sum_{j != i, y_j = y_i} log [exp(z_i.z_j / tau) / sum_{k != i} exp(z_i.z_k / tau)]
  L = (1 - lambda) CE + lambda L_SCL / N
(anchors without a positive in the batch are left out of the mean). loss="cosine" is SetFit's pair
loss (Tunstall et al. 2022) over every in-batch pair: mean_{i < j} (cos(p_i, p_j) - [y_i = y_j])^2.
Both shape the embedding the head reads, which is what a sentence-embedding checkpoint was trained
for; use them with model.pooling=mean for such checkpoints (all-MiniLM-L6-v2, all-mpnet-base-v2).
Packed batches (jaxft.data.packing) need nothing more: the pooled embeddings, logits and labels are
per slot [E], and unused slots (example_mask 0) are neither anchors nor keys.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxft.objectives.base import StepContext, Weighted, example_weights
from jaxft.objectives.registry import Objective, register
from jaxft.objectives.supervised import cross_entropy, masked_mean

LOSSES = ("supcon", "cosine")


def _unit(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def supcon_loss(embeddings: jax.Array, labels: jax.Array, weights: jax.Array,
                temperature: float) -> jax.Array:
  """Gunel et al.'s L_SCL / N over the real rows (`weights` 1) of embeddings [B, H], labels [B]."""
  z = _unit(embeddings)
  logits = z @ z.T / temperature
  others = (1.0 - jnp.eye(z.shape[0])) * weights[None, :]  # k != i, real rows only
  logits = jnp.where(others > 0, logits, -jnp.inf)
  log_prob = jax.nn.log_softmax(logits, axis=-1)
  positive = others * (labels[:, None] == labels[None, :])
  n_pos = jnp.sum(positive, -1)
  per_anchor = -jnp.sum(jnp.where(positive > 0, log_prob, 0.0), -1) / jnp.maximum(n_pos, 1.0)
  return masked_mean(per_anchor, weights * (n_pos > 0))


def cosine_pair_loss(embeddings: jax.Array, labels: jax.Array, weights: jax.Array) -> jax.Array:
  """SetFit's CosineSimilarityLoss over every pair i < j of real rows: (cos - [same label])^2."""
  z = _unit(embeddings)
  target = (labels[:, None] == labels[None, :]).astype(jnp.float32)
  pairs = jnp.triu(jnp.ones((z.shape[0],) * 2), 1) * weights[:, None] * weights[None, :]
  return masked_mean(jnp.square(z @ z.T - target), pairs)


def contrastive_term(weight: float, temperature: float, loss: str, label_smoothing: float = 0.0):
  """(1 - weight) CE + weight * contrastive loss of the pooled embeddings; metrics ce,
  contrastive, accuracy."""

  def term(apply_fn, params, batch, rng, ctx: StepContext):
    out = apply_fn(params, batch, rng=rng, deterministic=False)
    labels, w = batch["labels"], example_weights(batch)
    ce = masked_mean(cross_entropy(out.logits, labels, label_smoothing), w)
    if loss == "supcon":
      con = supcon_loss(out.pooled, labels, w, temperature)
    else:
      con = cosine_pair_loss(out.pooled, labels, w)
    acc = masked_mean((jnp.argmax(out.logits, -1) == labels).astype(jnp.float32), w)
    return (1.0 - weight) * ce + weight * con, {"ce": ce, "contrastive": con, "accuracy": acc}

  return term


@register("contrastive", defaults={"weight": 0.9, "temperature": 0.3, "loss": "supcon",
                                   "label_smoothing": 0.0})
def contrastive(options, info) -> Objective:
  if info.kind != "classification":
    raise ValueError(f"objective 'contrastive' needs a classification task (labels of classes); "
                     f"task kind is {info.kind!r}: use objective.name=supervised")
  if options.loss not in LOSSES:
    raise ValueError(f"objective.contrastive.loss must be one of {', '.join(LOSSES)}, got "
                     f"{options.loss!r}")
  if not 0.0 <= float(options.weight) <= 1.0:
    raise ValueError(f"objective.contrastive.weight (lambda) must be in [0, 1], got "
                     f"{options.weight}")
  if float(options.temperature) <= 0.0:
    raise ValueError(f"objective.contrastive.temperature must be > 0, got {options.temperature}")
  return Objective(terms={"contrastive": Weighted(contrastive_term(
      float(options.weight), float(options.temperature), options.loss,
      float(options.label_smoothing)))})
