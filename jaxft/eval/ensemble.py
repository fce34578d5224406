"""Ensembles at eval time and model soups over fine-tuned parameters.

Output ensembles: the mean of K models' logits [K, N, ...] (or of their softmax probabilities),
evaluated like one model. Model soups (Wortsman et al. 2022, "Model soups: averaging weights of
multiple fine-tuned models improves accuracy without increasing inference time"): fine-tuned
parameter trees theta_1..theta_K from one pretrained start;
  uniform soup: theta = (1/K) sum_k theta_k;
  greedy soup: sort ingredients by their own held-out score, best first; start from the best and
    add the next ingredient only if the soup of (current ingredients + it) scores at least as well
    on held-out data (their Recipe 1).
Averages are computed as theta_1 + (1/K) sum_k (theta_k - theta_1), so K identical trees average
to exactly that tree (bitwise), and the sum never grows with K.

Everything here takes arrays and parameter trees, not workdirs, so it imports nothing from jaxft;
`jaxft.harness.analysis.load_workdir_params` reads the ingredients of finished runs.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def average_logits(logits: Sequence, *, probs: bool = False, weights: Sequence[float] | None = None
                   ) -> np.ndarray:
  """K arrays [N, ...] of the same shape -> their (weighted) mean [N, ...] float32.

  probs=True averages softmax probabilities over the last axis and returns log of the mean, so the
  result still argmaxes and feeds a cross-entropy like logits do.
  """
  arrs = [np.asarray(x, np.float64) for x in logits]
  if not arrs:
    raise ValueError("average_logits needs at least one model's logits")
  shape = arrs[0].shape
  for i, a in enumerate(arrs):
    if a.shape != shape:
      raise ValueError(f"model {i} logits have shape {a.shape}, model 0 {shape}: every model must "
                       "be evaluated on the same examples in the same order")
  w = np.ones(len(arrs)) if weights is None else np.asarray(weights, np.float64)
  if w.shape != (len(arrs),) or np.any(w < 0) or w.sum() <= 0:
    raise ValueError(f"weights must be {len(arrs)} non-negative numbers with a positive sum")
  w = w / w.sum()
  if probs:
    p = [np.exp(a - a.max(-1, keepdims=True)) for a in arrs]
    p = [x / x.sum(-1, keepdims=True) for x in p]
    mean = sum(wi * pi for wi, pi in zip(w, p))
    return np.log(np.maximum(mean, 1e-30)).astype(np.float32)
  return sum(wi * a for wi, a in zip(w, arrs)).astype(np.float32)


def ensemble_metrics(logits: Sequence, labels, metric_fn: Callable[[np.ndarray, np.ndarray], dict],
                     *, probs: bool = False) -> dict:
  """metric_fn(averaged_logits, labels) -> metrics of the ensemble, plus each member's own
  metrics under "member_<k>/<name>" for comparison."""
  out = dict(metric_fn(average_logits(logits, probs=probs), np.asarray(labels)))
  for k, lg in enumerate(logits):
    out.update({f"member_{k}/{n}": v for n, v in metric_fn(np.asarray(lg), np.asarray(labels)).items()})
  return out


def _check_same_structure(trees: Sequence) -> None:
  ref = jax.tree_util.tree_structure(trees[0])
  for i, t in enumerate(trees[1:], start=1):
    if jax.tree_util.tree_structure(t) != ref:
      raise ValueError(f"ingredient {i} has a different parameter structure from ingredient 0; "
                       "soups need fine-tunes of the same model with the same head and PEFT method")
    for a, b in zip(jax.tree_util.tree_leaves(trees[0]), jax.tree_util.tree_leaves(t)):
      if a.shape != b.shape:
        raise ValueError(f"ingredient {i}: a leaf of shape {b.shape} where ingredient 0 has {a.shape}")


def uniform_soup(trees: Sequence, weights: Sequence[float] | None = None):
  """(Weighted) mean of K parameter pytrees of identical structure, leaf dtypes kept.

  Computed as t_1 + sum_k w_k (t_k - t_1) with sum w = 1 (float32 accumulation)."""
  if not trees:
    raise ValueError("a soup needs at least one ingredient")
  _check_same_structure(trees)
  w = np.ones(len(trees)) if weights is None else np.asarray(weights, np.float64)
  w = w / w.sum()

  def avg(first, *rest):
    acc = jnp.zeros(first.shape, jnp.float32)
    for wk, x in zip(w[1:], rest):
      acc = acc + jnp.float32(wk) * (x.astype(jnp.float32) - first.astype(jnp.float32))
    return (first.astype(jnp.float32) + acc).astype(first.dtype)

  return jax.tree_util.tree_map(avg, trees[0], *trees[1:])


@dataclasses.dataclass
class GreedySoup:
  params: object
  ingredients: list[int]  # indices into the input list, in the order they were added
  score: float  # held-out score of the soup
  individual: list[float]  # each ingredient's own held-out score
  history: list[tuple[int, float, bool]]  # (candidate, soup score with it, kept?)


def greedy_soup(trees: Sequence, score_fn: Callable[[object], float]) -> GreedySoup:
  """Wortsman et al. 2022 greedy soup; score_fn(params) -> held-out metric, higher is better.

  Ties keep the candidate (their `>=`), so identical ingredients all join."""
  if not trees:
    raise ValueError("a soup needs at least one ingredient")
  _check_same_structure(trees)
  individual = [float(score_fn(t)) for t in trees]
  order = sorted(range(len(trees)), key=lambda k: (-individual[k], k))
  chosen = [order[0]]
  best = individual[order[0]]
  soup = trees[order[0]]
  history = [(order[0], best, True)]
  for k in order[1:]:
    candidate = uniform_soup([trees[i] for i in chosen + [k]])
    s = float(score_fn(candidate))
    keep = s >= best
    history.append((k, s, keep))
    if keep:
      chosen.append(k)
      best, soup = s, candidate
  return GreedySoup(params=soup, ingredients=chosen, score=best, individual=individual,
                    history=history)
