"""Tokenization with the checkpoint's (fast) tokenizer, cached on disk, into ragged flat arrays.

A split becomes an `Encoded`: every example's token ids laid end to end (no padding; batching pads
per bucket). Sentence pairs are encoded as the tokenizer pairs them ([CLS] a [SEP] b [SEP] with
token_type_ids 0/1 for BERT); over-long inputs are truncated to max_length ("longest_first") and
counted. Token classification (NER) labels each word's first sub-token with the word's tag id and
every other position with -100 (Devlin et al. 2019, sec. 5.3); `word_index` keeps, per token, the
word it starts (-1 elsewhere), the bookkeeping that maps token predictions back to words.

The cache file is <cache_dir>/<sha256 of (tokenizer identity, max_length, kind, data
fingerprint)>.npz, written atomically; the tokenizer identity is a hash of its full serialized
state (vocab, normalizer, pre-tokenizer, special tokens), not its path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import tempfile

import numpy as np

from jaxft.data.tasks import IGNORE, Examples

_VERSION = 1  # bump when the encoding below changes, to invalidate old cache files
_CHUNK = 2048  # examples per tokenizer call (bounds peak memory of the Python lists)


@dataclasses.dataclass
class Encoded:
  """One tokenized split, ragged. Example i spans flat positions offsets[i]:offsets[i+1].

  input_ids, token_type_ids: int32 [T]. offsets: int64 [N + 1]. truncated: bool [N].
  labels: int32 [N] (classification), float32 [N] (regression), int32 [T] (token tasks, -100 =
    ignore), or None (unlabeled). word_index: int32 [T], token tasks only: the word a token starts.
  n_words: int32 [N], token tasks only. pad_id: the tokenizer's padding id.
  """

  input_ids: np.ndarray
  token_type_ids: np.ndarray
  offsets: np.ndarray
  truncated: np.ndarray
  labels: np.ndarray | None
  pad_id: int
  kind: str
  word_index: np.ndarray | None = None
  n_words: np.ndarray | None = None

  def __len__(self) -> int:
    return len(self.offsets) - 1

  @property
  def lengths(self) -> np.ndarray:
    return np.diff(self.offsets).astype(np.int32)

  def row(self, i: int) -> slice:
    return slice(int(self.offsets[i]), int(self.offsets[i + 1]))

  def stats(self) -> dict[str, float]:
    lengths = self.lengths
    return {"n_examples": len(self), "n_truncated": int(self.truncated.sum()),
            "mean_length": float(lengths.mean()) if len(self) else 0.0,
            "max_length": int(lengths.max()) if len(self) else 0}


def tokenizer_fingerprint(tokenizer) -> str:
  """sha256 over the tokenizer's serialized state (a fast tokenizer's tokenizer.json, without the
  truncation/padding settings its last call left behind)."""
  h = hashlib.sha256(type(tokenizer).__name__.encode())
  backend = getattr(tokenizer, "backend_tokenizer", None)
  if backend is not None:
    # truncation/padding are call-time state the tokenizer keeps from its last call, not identity
    state = json.loads(backend.to_str())
    state.pop("truncation", None)
    state.pop("padding", None)
    h.update(json.dumps(state, separators=(",", ":")).encode())
  else:  # slow tokenizer: its vocab and special tokens are what it maps text with
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
  h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
  return h.hexdigest()


def cache_key(tokenizer, examples: Examples, *, kind: str, max_length: int,
              tokenizer_id: str | None = None) -> str:
  parts = {"v": _VERSION, "tok": tokenizer_id or tokenizer_fingerprint(tokenizer),
           "max_length": max_length,
           "kind": kind, "data": examples.fingerprint()}
  return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def encode(examples: Examples, tokenizer, *, kind: str, max_length: int,
           cache_dir: str | os.PathLike | None = None, tokenizer_id: str | None = None) -> Encoded:
  """Tokenizes a split (or loads it from the cache). See the module docstring.
  tokenizer_id: tokenizer_fingerprint(tokenizer) when the caller has it (it costs ~0.1 s)."""
  if max_length < 4:
    raise ValueError(f"data.max_length={max_length} leaves no room for text and special tokens")
  path = None
  if cache_dir:
    key = cache_key(tokenizer, examples, kind=kind, max_length=max_length,
                    tokenizer_id=tokenizer_id)
    path = pathlib.Path(cache_dir) / f"{key}.npz"
    if path.is_file():
      return _load(path, kind)
  if kind == "token_classification":
    enc = _encode_words(examples, tokenizer, max_length)
  else:
    enc = _encode_texts(examples, tokenizer, max_length, kind)
  if path is not None:
    _save(path, enc)
  return enc


def _pad_id(tokenizer) -> int:
  if tokenizer.pad_token_id is None:
    raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no pad token; set one "
                     "(tokenizer.pad_token = ...) before building batches")
  return int(tokenizer.pad_token_id)


def _call(tokenizer, *args, truncate: bool, max_length: int, **kw):
  return tokenizer(*args, truncation="longest_first" if truncate else False,
                   max_length=max_length if truncate else None, padding=False,
                   return_token_type_ids=True, return_attention_mask=False, verbose=False, **kw)


def _encode_texts(ex: Examples, tokenizer, max_length: int, kind: str) -> Encoded:
  ids, types, truncated = [], [], []
  n = len(ex)
  for start in range(0, n, _CHUNK):
    cols = [c[start:start + _CHUNK] for c in ex.texts]
    # Untruncated first, so truncation is counted exactly; only the long ones are re-encoded.
    out = _call(tokenizer, *cols, truncate=False, max_length=max_length)
    chunk_ids, chunk_types = out["input_ids"], out.get("token_type_ids")
    if chunk_types is None:
      chunk_types = [[0] * len(x) for x in chunk_ids]
    long = [i for i, x in enumerate(chunk_ids) if len(x) > max_length]
    if long:
      fix = _call(tokenizer, *[[c[i] for i in long] for c in cols], truncate=True,
                  max_length=max_length)
      for j, i in enumerate(long):
        chunk_ids[i] = fix["input_ids"][j]
        chunk_types[i] = fix["token_type_ids"][j] if "token_type_ids" in fix else \
            [0] * len(fix["input_ids"][j])
    long_set = set(long)
    ids.extend(chunk_ids)
    types.extend(chunk_types)
    truncated.extend(i in long_set for i in range(len(chunk_ids)))
  labels = None
  if ex.labels is not None:
    labels = np.asarray(ex.labels, np.float32 if kind == "regression" else np.int32)
  return Encoded(*_flatten(ids, types), truncated=np.asarray(truncated, bool), labels=labels,
                 pad_id=_pad_id(tokenizer), kind=kind)


def _encode_words(ex: Examples, tokenizer, max_length: int) -> Encoded:
  if not getattr(tokenizer, "is_fast", False):
    raise ValueError("token classification needs a fast tokenizer (for word_ids); "
                     f"{type(tokenizer).__name__} is not one")
  ids, types, labels, word_index, truncated = [], [], [], [], []
  for start in range(0, len(ex), _CHUNK):
    words = ex.words[start:start + _CHUNK]
    out = _call(tokenizer, words, truncate=False, max_length=max_length, is_split_into_words=True)
    encs = [out.encodings[i] for i in range(len(words))]
    long = [i for i, e in enumerate(encs) if len(e.ids) > max_length]
    if long:
      fix = _call(tokenizer, [words[i] for i in long], truncate=True, max_length=max_length,
                  is_split_into_words=True)
      for j, i in enumerate(long):
        encs[i] = fix.encodings[j]
    long_set = set(long)
    for i, e in enumerate(encs):
      tags = ex.labels[start + i] if ex.labels is not None else None
      first = np.full(len(e.ids), -1, np.int32)
      lab = np.full(len(e.ids), IGNORE, np.int32)
      prev = None
      for pos, w in enumerate(e.word_ids):
        if w is not None and w != prev:  # the first sub-token of word w
          first[pos] = w
          if tags is not None:
            lab[pos] = tags[w]
        prev = w
      ids.append(e.ids)
      types.append(e.type_ids)
      labels.append(lab)
      word_index.append(first)
      truncated.append(i in long_set)
  input_ids, token_type_ids, offsets = _flatten(ids, types)
  cat = lambda xs: np.concatenate(xs).astype(np.int32) if xs else np.zeros(0, np.int32)
  return Encoded(input_ids, token_type_ids, offsets, np.asarray(truncated, bool),
                 cat(labels) if ex.labels is not None else None, _pad_id(tokenizer),
                 "token_classification", word_index=cat(word_index),
                 n_words=np.asarray([len(w) for w in ex.words], np.int32))


def _flatten(ids, types):
  lengths = np.fromiter((len(x) for x in ids), np.int64, len(ids))
  offsets = np.zeros(len(ids) + 1, np.int64)
  np.cumsum(lengths, out=offsets[1:])
  flat = lambda xs: np.fromiter((t for x in xs for t in x), np.int32, int(offsets[-1]))
  return flat(ids), flat(types), offsets


_FIELDS = ("input_ids", "token_type_ids", "offsets", "truncated", "labels", "word_index", "n_words")


def _save(path: pathlib.Path, enc: Encoded) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  arrays = {k: getattr(enc, k) for k in _FIELDS if getattr(enc, k) is not None}
  arrays["pad_id"] = np.asarray(enc.pad_id)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tok-", suffix=".npz")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **arrays)
    os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the whole new one
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def _load(path: pathlib.Path, kind: str) -> Encoded:
  with np.load(path) as z:
    get = lambda k: z[k] if k in z.files else None
    return Encoded(z["input_ids"], z["token_type_ids"], z["offsets"], z["truncated"],
                   get("labels"), int(z["pad_id"]), kind, get("word_index"), get("n_words"))
