"""Evaluation metrics with stable names, computed on host (numpy) from predictions and labels.

`compute(info, predictions, labels, mask=None) -> dict[str, float]` by task kind:
  classification: accuracy; f1 (binary F1 of class 1 for 2 classes, macro F1 otherwise);
    f1_macro (unweighted mean of per-class F1); mcc (Matthews correlation,
    (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)), multi-class via Gorodkin's R_K).
  regression: pearson, spearman (rank correlation), mse. NaN when a side is constant.
  token_classification: entity_f1 / entity_precision / entity_recall, entity-level as seqeval's
    default mode computes them (the conlleval rules: a chunk starts at B-X, at I-X after O or
    after another type, so IOB1 and IOB2 tags both work), and token_accuracy.
Token predictions and labels are [N, S] arrays or lists of [S_i] arrays; positions whose label is
-100 (non-first sub-tokens, specials, padding) are dropped before scoring.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np

IGNORE = -100


def predictions_from_logits(kind: str, logits) -> np.ndarray:
  """logits [B, C] -> int class ids [B]; regression [B, 1] or [B] -> float [B];
  token classification [B, S, C] -> int tag ids [B, S]."""
  logits = np.asarray(logits)
  if kind == "regression":
    return (logits[..., 0] if logits.ndim == 2 else logits).astype(np.float32)
  if kind in ("classification", "token_classification"):
    return np.argmax(logits, axis=-1).astype(np.int32)
  raise ValueError(f"unknown task kind {kind!r}; known: classification, regression, "
                   "token_classification")


def accuracy(pred, gold) -> float:
  pred, gold = np.asarray(pred), np.asarray(gold)
  return float(np.mean(pred == gold)) if len(gold) else math.nan


def classification_metrics(pred, gold, num_labels: int) -> dict[str, float]:
  from sklearn.metrics import f1_score, matthews_corrcoef
  pred, gold = np.asarray(pred, np.int64), np.asarray(gold, np.int64)
  labels = list(range(max(num_labels, 2)))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # undefined F1 of an absent class counts as 0, said in doc
    f1_macro = float(f1_score(gold, pred, labels=labels, average="macro", zero_division=0))
    f1 = float(f1_score(gold, pred, average="binary", pos_label=1, zero_division=0)) \
        if num_labels == 2 else f1_macro
    mcc = float(matthews_corrcoef(gold, pred))
  return {"accuracy": accuracy(pred, gold), "f1": f1, "f1_macro": f1_macro, "mcc": mcc}


def regression_metrics(pred, gold) -> dict[str, float]:
  from scipy import stats
  pred, gold = np.asarray(pred, np.float64), np.asarray(gold, np.float64)
  out = {"mse": float(np.mean((pred - gold) ** 2)) if len(gold) else math.nan}
  if len(gold) < 2 or np.all(pred == pred[0]) or np.all(gold == gold[0]):
    out.update(pearson=math.nan, spearman=math.nan)  # correlation of a constant is undefined
  else:
    out["pearson"] = float(stats.pearsonr(pred, gold)[0])
    out["spearman"] = float(stats.spearmanr(pred, gold)[0])
  return out


def entity_scores(pred_tags: Sequence[Sequence[str]],
                  gold_tags: Sequence[Sequence[str]]) -> dict[str, float]:
  """Entity-level precision/recall/F1 over tag-string sequences (seqeval default = conlleval)."""
  from seqeval.metrics import f1_score, precision_score, recall_score
  pred_tags, gold_tags = [list(p) for p in pred_tags], [list(g) for g in gold_tags]
  for i, (p, g) in enumerate(zip(pred_tags, gold_tags)):
    if len(p) != len(g):
      raise ValueError(f"sentence {i}: {len(p)} predicted tags but {len(g)} gold tags")
  if len(pred_tags) != len(gold_tags):
    raise ValueError(f"{len(pred_tags)} predicted sentences but {len(gold_tags)} gold sentences")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # no predicted / no gold entities: seqeval warns, scores 0
    return {"entity_precision": float(precision_score(gold_tags, pred_tags, zero_division=0)),
            "entity_recall": float(recall_score(gold_tags, pred_tags, zero_division=0)),
            "entity_f1": float(f1_score(gold_tags, pred_tags, zero_division=0))}


def tag_sequences(label_names: Sequence[str], predictions, labels):
  """Keeps positions with label != -100 -> (pred tag strings, gold tag strings) per sentence."""
  preds, golds = [], []
  for i, (p, g) in enumerate(zip(predictions, labels)):
    p, g = np.asarray(p), np.asarray(g)
    if p.shape != g.shape:
      raise ValueError(f"sentence {i}: predictions of shape {p.shape} but labels of {g.shape}")
    keep = g != IGNORE
    preds.append([label_names[int(t)] for t in p[keep]])
    golds.append([label_names[int(t)] for t in g[keep]])
  return preds, golds


def token_metrics(label_names, predictions, labels) -> dict[str, float]:
  preds, golds = tag_sequences(label_names, predictions, labels)
  out = entity_scores(preds, golds)
  n = sum(len(g) for g in golds)
  out["token_accuracy"] = (sum(int(a == b) for p, g in zip(preds, golds) for a, b in zip(p, g)) / n
                           if n else math.nan)
  return out


def compute(info, predictions, labels, mask=None) -> dict[str, float]:
  """All metrics of info.kind (a superset of info.metric_names) as Python floats.

  predictions/labels: [N] (classification ids, regression floats) or per-sentence tag ids
  ([N, S] array or list of arrays, -100 = ignore). mask: optional [N], rows with 0 are dropped
  (padding rows of the last eval batch).
  """
  if mask is not None:
    keep = np.flatnonzero(np.asarray(mask) > 0)
    predictions = [predictions[i] for i in keep] if isinstance(predictions, list) \
        else np.asarray(predictions)[keep]
    labels = [labels[i] for i in keep] if isinstance(labels, list) else np.asarray(labels)[keep]
  if len(predictions) != len(labels):
    raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
  if info.kind == "classification":
    return classification_metrics(predictions, labels, info.num_labels)
  if info.kind == "regression":
    return regression_metrics(predictions, labels)
  if info.kind == "token_classification":
    return token_metrics(info.label_names, predictions, labels)
  raise ValueError(f"unknown task kind {info.kind!r}")
