"""Evaluation: a jitted forward over every eval example once, then metrics on the host.

The forward is jitted once per batch shape (one for packed batches, one per bucket otherwise);
predictions and labels come back to the host, padding rows and unused slots (example_mask = 0)
are dropped (token logits of packed rows are cut back into one array per example), and `jaxft.eval.metrics.compute` names the numbers. Token
classification (NER) is scored over words, as conlleval does: each word takes its first
sub-token's prediction (`pipeline.WordAlignment`), and truncated words count as "O".
The weights evaluated are `Setup.eval_params` (EMA / SWA when train.eval_with says so, pruning
masks applied); `int8_metrics` scores the same weights after post-training int8 quantization;
`inference_speed` times the forward.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxft.data import packing
from jaxft.eval import metrics as metrics_lib
from jaxft.train import mesh as mesh_lib
from jaxft.core.state import flatten


def resolve_split(setup, split: str | None = None) -> str:
  """The eval split to score: `split`, or the first of data.eval_split; KeyError if the setup's
  data did not build it (jaxft.train.restore.load_workdir(eval_splits=...) builds any split the
  task has; a split the task lacks fails there, naming the task's splits)."""
  split = split or str(setup.config.data.eval_split).split(",")[0].strip()
  if split not in setup.data.eval:
    raise KeyError(f"eval split {split!r} was not built; this setup's data has "
                   f"{sorted(setup.data.eval)}. Fix: build the setup with data.eval_split "
                   f"naming {split!r} (load_workdir(..., eval_splits=[{split!r}]) does)")
  return split


class Evaluator:
  """Scores one eval split (data.eval_split; the first of a comma-separated list by default).

  forward(state, batch) -> logits may replace the default (the training forward on eval_params).
  """

  def __init__(self, setup, split: str | None = None, forward=None):
    self.setup = setup
    self.split = resolve_split(setup, split)
    if forward is None:
      apply_fn = setup.apply_fn or setup.model.apply
      jitted = jax.jit(
          lambda tr, fr, ex, b: apply_fn(setup.eval_params(tr, fr, ex), b,
                                         deterministic=True).logits.astype(jnp.float32),
          out_shardings=NamedSharding(setup.mesh, P()))
      forward = lambda state, batch: jitted(state.trainable, state.frozen, state.extras, batch)
    self._forward = forward

  def real_logits(self, state, batch) -> np.ndarray:
    """Host logits of one batch's real rows (example_mask > 0); the batch need not have labels."""
    return self._real_rows(state, batch)[0]

  def _real_rows(self, state, batch):
    """(logits, labels or None) of the global batch's real rows, on every process: `batch` is
    this process's share of the rows (put_batch), the numbers are the whole batch's."""
    device_batch = mesh_lib.put_batch(batch, self.setup.mesh)
    logits = self._forward(state, device_batch)
    packed = "segment_ids" in device_batch and logits.ndim == 3  # token logits of packed rows
    keys = ("example_mask", "labels") + (packing.PACKING_KEYS if packed else ())
    host = mesh_lib.gather_to_host({"logits": logits, **{k: device_batch[k] for k in keys
                                                         if k in device_batch}})
    if packed:  # one [n_e, C] array per real example, in slot (= file) order
      labels = packing.unpack_tokens(host, host["labels"]) if "labels" in host else None
      return packing.unpack_tokens(host, host["logits"]), labels
    keep = np.asarray(host["example_mask"]) > 0
    labels = np.asarray(host["labels"])[keep] if "labels" in host else None
    return np.asarray(host["logits"])[keep], labels

  def logits_and_labels(self, state):
    """-> (logits, labels) over the real examples of the split, in order: arrays [N, ...] for
    sequence tasks, per-example lists of [S_i, ...] rows for token classification (buckets differ
    in length)."""
    all_logits, all_labels = [], []
    for batch in self.setup.data.eval[self.split]():
      logits, labels = self._real_rows(state, batch)
      all_logits.extend(logits)
      all_labels.extend(labels)
    if self.setup.data.info.kind == "token_classification":
      return all_logits, all_labels
    return np.stack(all_logits), np.stack(all_labels)

  def evaluate(self, state) -> dict:
    info = self.setup.data.info
    logits, labels = self.logits_and_labels(state)
    if info.kind == "token_classification":
      token_preds = [np.argmax(x, axis=-1) for x in logits]
      words = self.setup.data.ner[self.split]
      return metrics_lib.compute(info, words.word_predictions(token_preds), words.gold)
    preds = metrics_lib.predictions_from_logits(info.kind, logits)
    return metrics_lib.compute(info, preds, labels)


def inference_speed(setup, state, split: str | None = None, passes: int = 3) -> dict:
  """Examples/s of the evaluated forward over one eval split: one pass compiles every bucket
  shape, then the best of `passes` timed passes (logits fetched to the host, as evaluation does).
  {"examples_per_s", "examples", "passes", "params"}: params counts the evaluated weights (a
  distilled student's, a pruned model's before its zeros are dropped). Other work on the machine
  changes the number."""
  if passes < 1:
    raise ValueError(f"inference speed needs passes >= 1, got {passes}")
  ev = Evaluator(setup, split)
  ev.logits_and_labels(state)
  times = []
  for _ in range(passes):
    t0 = time.perf_counter()
    logits, _ = ev.logits_and_labels(state)
    times.append(time.perf_counter() - t0)
  params = jax.eval_shape(setup.eval_params, state.trainable, state.frozen, state.extras)
  return {"examples_per_s": len(logits) / min(times), "examples": len(logits), "passes": passes,
          "params": sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))}


def int8_metrics(setup, state, split: str | None = None) -> dict:
  """Post-training int8 (per-channel symmetric) quantization of the evaluated weights:
  {"eval": metrics on int8 weights, "size": jaxft.quant.int8.size_report}."""
  from jaxft.quant import int8
  params = jax.jit(setup.eval_params)(state.trainable, state.frozen, state.extras)
  flat = jax.device_get(flatten(params))
  qflat = int8.quantize_params(flat, setup.quant_spec or int8.QuantSpec())
  apply = int8.quantized_apply(setup.model.apply)
  jitted = jax.jit(lambda q, b: apply(q, b, deterministic=True).logits.astype(jnp.float32))
  metrics = Evaluator(setup, split, forward=lambda _, batch: jitted(qflat, batch)).evaluate(state)
  return {"eval": metrics, "size": int8.size_report(flat, qflat)}


def robustness_metrics(setup, state, split: str | None = None, *, epsilons=(), pgd_steps: int = 10,
                       pgd_examples: int = 0, synonym_examples: int = 0,
                       max_swap_fraction: float = 0.2) -> dict:
  """Robust accuracy of the evaluated weights (jaxft.eval.robustness) on one eval split:
  {"pgd": {"clean_accuracy", "pgd_l2/<eps>/accuracy", ..., "examples"}} for an L2 embedding-space
  PGD attack of `pgd_steps` steps at each epsilon on the first eval batches holding at least
  `pgd_examples` examples (0 = all; each attack costs pgd_steps forward+backward passes), and
  {"synonyms": {...}} for the greedy WordNet substitution attack on the split's first
  `synonym_examples` texts (single-text tasks)."""
  from jaxft.eval import robustness
  from jaxft.train.setup import load_tokenizer
  split = resolve_split(setup, split)
  kind = setup.data.info.kind
  apply_fn = setup.apply_fn or setup.model.apply
  params = jax.jit(setup.eval_params)(state.trainable, state.frozen, state.extras)
  synonyms = None
  if synonym_examples:  # checked before any attack runs
    ex = setup.data.examples[split]
    if kind != "classification" or len(ex.texts) != 1:
      raise ValueError("the synonym attack needs a single-text classification task; "
                       f"{setup.data.info.name} has {len(ex.texts)} text column(s), kind {kind}")
    synonyms = robustness.WordNet()
  out = {}
  if epsilons:
    batches, n = [], 0
    for batch in setup.data.eval[split]():
      batches.append(batch)
      n += int(np.sum(np.asarray(batch["example_mask"]) > 0))
      if pgd_examples and n >= pgd_examples:
        break
    out["pgd"] = {**robustness.pgd_robustness(apply_fn, params, batches, kind,
                                              [float(e) for e in epsilons], steps=pgd_steps,
                                              seed=int(setup.config.seed)), "examples": n}
  if synonyms is not None:
    n = min(int(synonym_examples), len(ex))
    predict = robustness.text_classifier(apply_fn, params, load_tokenizer(setup.config.model.name),
                                         max_length=int(setup.config.data.max_length))
    result = robustness.word_substitution_attack(predict, ex.texts[0][:n], ex.labels[:n],
                                                 synonyms,
                                                 max_swap_fraction=max_swap_fraction)
    out["synonyms"] = {**result.metrics, "examples": n}
  return out
