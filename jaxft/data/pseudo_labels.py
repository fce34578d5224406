"""Pseudo-labels for rows of the unlabeled pool, as a file a training run reads (data.pseudo_labels).

Self-training (jaxft.recipes.self_training) writes one per round: the teacher's hard labels for the
pool rows it selected. The pool is the train split minus the k-per-class labeled subset
(data.labeled_per_class, seeded), so a row index means something only for that pool: the file
carries the pool's fingerprint and a run on any other pool (other seed, k, data or
max_train_examples) is refused.

    {"pool_fingerprint": "<sha256>", "pool_size": 9445, "rows": [12, 40, ...], "labels": [1, 0, ...],
     ...anything else (round, threshold, confidence): kept for the reader, ignored here}
"""

from __future__ import annotations

import json
import pathlib
from typing import Sequence

import numpy as np

from jaxft.data.readers import DataError
from jaxft.data.tasks import Examples


def save(path, pool: Examples, rows: Sequence[int], labels: Sequence[int], **meta) -> pathlib.Path:
  """Writes the pseudo-labels of `pool` rows `rows` to `path` (JSON); meta: extra fields."""
  rows, labels = np.asarray(rows, np.int64), np.asarray(labels, np.int64)
  if rows.shape != labels.shape or rows.ndim != 1:
    raise ValueError(f"rows {rows.shape} and labels {labels.shape} must be equal-length vectors")
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  record = {"pool_fingerprint": pool.fingerprint(), "pool_size": len(pool),
            "rows": rows.tolist(), "labels": labels.tolist(), **meta}
  path.write_text(json.dumps(record))
  return path


def load(path, pool: Examples, num_labels: int) -> tuple[np.ndarray, np.ndarray]:
  """-> (rows, labels) int64, checked against `pool` before any training."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise DataError(f"data.pseudo_labels={str(path)!r}: no such file. It is written by "
                    "self-training (self_training.rounds > 0) or jaxft.data.pseudo_labels.save")
  try:
    record = json.loads(path.read_text())
    rows = np.asarray(record["rows"], np.int64)
    labels = np.asarray(record["labels"], np.int64)
    fingerprint = record["pool_fingerprint"]
  except (ValueError, KeyError, TypeError) as e:
    raise DataError(f"data.pseudo_labels={str(path)!r} is not a pseudo-labels file (JSON with "
                    f"pool_fingerprint, rows, labels): {e}") from e
  if fingerprint != pool.fingerprint():
    raise DataError(f"data.pseudo_labels={str(path)!r} labels another unlabeled pool (its "
                    f"{record.get('pool_size', '?')} rows vs {len(pool)} now): data, seed, "
                    "data.labeled_per_class or data.max_train_examples differ from the run that "
                    "wrote it. Fix: use the config that made the file, or label this pool anew.")
  if rows.shape != labels.shape or rows.ndim != 1:
    raise DataError(f"data.pseudo_labels={str(path)!r}: rows and labels must be equal-length lists")
  bad = rows[(rows < 0) | (rows >= len(pool))]
  if bad.size:
    raise DataError(f"data.pseudo_labels={str(path)!r}: row {int(bad[0])} is outside the pool "
                    f"(0..{len(pool) - 1})")
  if len(np.unique(rows)) != len(rows):
    raise DataError(f"data.pseudo_labels={str(path)!r}: a pool row is labeled twice")
  bad = labels[(labels < 0) | (labels >= num_labels)]
  if bad.size:
    raise DataError(f"data.pseudo_labels={str(path)!r}: label {int(bad[0])} is out of range for "
                    f"{num_labels} classes")
  return rows, labels


def extend(labeled: Examples, pool: Examples, rows: np.ndarray, labels: np.ndarray) -> Examples:
  """labeled + the pool rows `rows` with `labels` (sequence tasks), in that order."""
  extra = pool.select(rows)
  return Examples(texts=tuple(a + b for a, b in zip(labeled.texts, extra.texts)),
                  labels=list(labeled.labels) + [int(y) for y in labels],
                  source=f"{labeled.source} + {len(rows)} pseudo-labeled pool rows")
