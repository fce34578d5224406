"""Packed vs padded forward: the same examples as padded rows and packed into shared rows.

`packed_from_padded` turns a right-padded batch into a packed one with jaxft.data.packing.pack
(the code the train and eval batchers use), examples placed by first-fit decreasing into `rows`
rows of `length` tokens, with `spare` unused slots at the end. `check` runs a jaxft model on both
and compares per-example logits (sequence heads), per-token logits of every example (token and
MLM heads), the pooled output and the last hidden state of every real token.
"""

from __future__ import annotations

import jax
import numpy as np

from jaxft.data import packing
from jaxft.data.tokenize import Encoded

# The packed forward's agreement with the padded one (fp32, CPU): what tests/models assert.
TOL = 1e-5


def encoded_from_padded(batch: dict, pad_id: int, token_labels=None, labels=None) -> Encoded:
  mask = np.asarray(batch["attention_mask"]).astype(bool)
  n = mask.sum(1)
  ids = np.concatenate([np.asarray(batch["input_ids"])[i, :k] for i, k in enumerate(n)])
  types = batch.get("token_type_ids")
  types = (np.zeros_like(ids) if types is None else
           np.concatenate([np.asarray(types)[i, :k] for i, k in enumerate(n)]))
  kind = "classification"
  if token_labels is not None:
    labels = np.concatenate([np.asarray(token_labels)[i, :k] for i, k in enumerate(n)])
    kind = "token_classification"
  offsets = np.concatenate([[0], np.cumsum(n)]).astype(np.int64)
  return Encoded(ids.astype(np.int32), types.astype(np.int32), offsets, np.zeros(len(n), bool),
                 None if labels is None else np.asarray(labels), pad_id, kind)


def packed_from_padded(batch: dict, pad_id: int, *, rows: int, length: int, spare: int = 1,
                       token_labels=None, labels=None):
  """-> (packed batch, Encoded) holding batch's examples in slots 0..B-1 (in order)."""
  enc = encoded_from_padded(batch, pad_id, token_labels, labels)
  b = len(enc)
  row, off = packing.first_fit_decreasing(enc.lengths, rows, length)
  assert (row >= 0).all(), "the examples do not fit; give more rows"
  ex = np.concatenate([np.arange(b), np.full(spare, -1)])
  lay = packing.Layout(ex, np.concatenate([row, np.zeros(spare, np.int64)]),
                       np.concatenate([off, np.zeros(spare, np.int64)]))
  return packing.pack(enc, [lay], rows_per=rows, length=length, part_index=[0]), enc


def max_diff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def per_token(packed: dict, values) -> list[np.ndarray]:
  return packing.unpack_tokens(packed, np.asarray(values))


def compare(padded: dict, packed: dict, want, got) -> float:
  """The largest per-example difference between the padded forward's ModelOutput `want` and the
  packed one's `got` (last hidden state of every real token, logits, pooled)."""
  n = np.asarray(padded["attention_mask"]).sum(1)
  b = len(n)
  worst = 0.0
  hidden = per_token(packed, got.last_hidden_state)
  for i in range(b):
    worst = max(worst, max_diff(hidden[i], np.asarray(want.last_hidden_state)[i, :n[i]]))
  if got.logits is not None and got.logits.ndim == 2:  # sequence heads: one row per slot
    assert got.logits.shape[0] == packed["example_mask"].shape[0]
    worst = max(worst, max_diff(got.logits[:b], want.logits))
  elif got.logits is not None:
    tok = per_token(packed, got.logits)
    for i in range(b):
      worst = max(worst, max_diff(tok[i], np.asarray(want.logits)[i, :n[i]]))
  if want.pooled is not None:
    worst = max(worst, max_diff(got.pooled[:b], want.pooled))
  return worst


def check(model, padded: dict, packed: dict, tol: float = TOL) -> float:
  """Asserts packed == padded per example within tol; returns the largest difference."""
  apply = jax.jit(model.apply)
  worst = compare(padded, packed, apply(model.params, padded), apply(model.params, packed))
  assert worst <= tol, f"packed vs padded differ by {worst:.3g} > {tol}"
  return worst
