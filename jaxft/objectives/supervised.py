"""Supervised loss terms: cross-entropy (label smoothing), MSE regression, token-level CE.

Every term averages over real examples only (`example_mask`), so a padded last batch gives the same
loss as the unpadded one. Packed batches (jaxft.data.packing) work unchanged: sequence logits and
labels are per slot [E], and token terms weight each token by its slot (base.token_weights).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxft.objectives.base import IGNORE, StepContext, Weighted, example_weights, token_weights
from jaxft.objectives.registry import Objective, register


def masked_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
  """sum(w * v) / max(sum(w), 1): mean over the rows that count; 0 when none do."""
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
  """Per-example CE [B] of logits [B, C] against int labels [B], with uniform label smoothing
  (Szegedy et al. 2016): target = (1 - eps) one_hot + eps / C."""
  num_classes = logits.shape[-1]
  targets = jax.nn.one_hot(labels, num_classes)
  if label_smoothing:
    targets = targets * (1.0 - label_smoothing) + label_smoothing / num_classes
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def classification_term(label_smoothing: float = 0.0):
  """Sequence classification: mean CE over real examples; metric `accuracy` of the batch."""

  def term(apply_fn, params, batch, rng, ctx: StepContext):
    out = apply_fn(params, batch, rng=rng, deterministic=False)
    w = example_weights(batch)
    loss = masked_mean(cross_entropy(out.logits, batch["labels"], label_smoothing), w)
    acc = masked_mean((jnp.argmax(out.logits, -1) == batch["labels"]).astype(jnp.float32), w)
    return loss, {"accuracy": acc}

  return term


def regression_term():
  """Regression (STS-B): mean squared error of logits[:, 0] against float labels."""

  def term(apply_fn, params, batch, rng, ctx: StepContext):
    out = apply_fn(params, batch, rng=rng, deterministic=False)
    pred = out.logits[..., 0].astype(jnp.float32)
    loss = masked_mean(jnp.square(pred - batch["labels"].astype(jnp.float32)), example_weights(batch))
    return loss, {}

  return term


def token_classification_term(label_smoothing: float = 0.0):
  """Token classification: CE over tokens whose label is not IGNORE (-100), e.g. first sub-tokens."""

  def term(apply_fn, params, batch, rng, ctx: StepContext):
    out = apply_fn(params, batch, rng=rng, deterministic=False)
    labels = batch["labels"]
    valid = token_weights(batch, labels)
    ce = cross_entropy(out.logits, jnp.where(labels == IGNORE, 0, labels), label_smoothing)
    loss = masked_mean(ce, valid)
    acc = masked_mean((jnp.argmax(out.logits, -1) == labels).astype(jnp.float32), valid)
    return loss, {"token_accuracy": acc}

  return term


def task_term(kind: str, label_smoothing: float = 0.0):
  """The supervised term for a task kind: classification / regression / token_classification."""
  if kind == "classification":
    return classification_term(label_smoothing)
  if kind == "regression":
    return regression_term()
  if kind == "token_classification":
    return token_classification_term(label_smoothing)
  raise ValueError(f"no supervised loss for task kind {kind!r}; known: classification, "
                   "regression, token_classification")


@register("supervised", defaults={"label_smoothing": 0.0})
def supervised(options, info) -> Objective:
  return Objective(terms={"sup": Weighted(task_term(info.kind, options.label_smoothing))})
