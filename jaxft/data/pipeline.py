"""The one call the training loop makes: data config + tokenizer -> batches, task info, stats.

    bundle = pipeline.build(config.data, tokenizer, batch_size=32, eval_batch_size=64, seed=0)
    for step in range(start, total):
      batch = bundle.train.batch_at(step)          # pure function of (seed, step)
    for name, make_iter in bundle.eval.items():
      for batch in make_iter(): ...                 # every example once, in order

Flow: tasks.load (files / assets / hub, validated) -> optional subsets (max_*_examples, first
rows; labeled_per_class, k per class seeded by `seed`, the rest an unlabeled pool; pseudo_labels,
a file of teacher labels for pool rows appended to the labeled ones) ->
tokenize.encode (cached) -> packing (data.packing, the default: whole examples packed into rows
of one static shape, jaxft.data.packing) or batching (length buckets), both with a resumable
order and eval batches in file order.

In a multi-process job each process builds only its rows of every train and eval batch (the rows
of its devices, `batching.shard_rows`); jaxft.train.mesh.put_batch joins them into the global
batch, which equals the one-process batch.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import pathlib
from typing import Callable, Iterator, Sequence

import numpy as np

from jaxft import assets
from jaxft.data import batching, packing as packing_lib, pseudo_labels, tasks, tokenize
from jaxft.data.readers import DataError
from jaxft.data.tasks import Examples, TaskInfo, as_list, cfg_get


@dataclasses.dataclass
class WordAlignment:
  """Word-level bookkeeping of a token-classification split, to score entities over words.

  first_token[i]: int32 [n_words_i], the token position (in example i's row) of each word's first
    sub-token, -1 when the word has no token (truncated away, or a character the tokenizer drops).
  gold[i]: the word tag ids (None for unlabeled splits). outside_id: the id of "O", predicted for
    words without a token, so truncation costs recall exactly as it would in a real tagger.
  """

  first_token: list[np.ndarray]
  gold: list[list[int]] | None
  outside_id: int

  @classmethod
  def from_encoded(cls, enc: tokenize.Encoded, examples: Examples, label_names) -> "WordAlignment":
    firsts = []
    for i in range(len(enc)):
      wi = enc.word_index[enc.row(i)]
      first = np.full(int(enc.n_words[i]), -1, np.int32)
      pos = np.flatnonzero(wi >= 0)
      first[wi[pos]] = pos
      firsts.append(first)
    outside = list(label_names).index("O") if "O" in label_names else 0
    return cls(firsts, examples.labels, outside)

  @property
  def n_words_without_token(self) -> int:
    return int(sum((f < 0).sum() for f in self.first_token))

  def word_predictions(self, token_predictions: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Per-example token predictions ([S_i] ids, any padding beyond the row is ignored) -> word
    predictions [n_words_i] (the first sub-token's; outside_id where a word has no token)."""
    if len(token_predictions) != len(self.first_token):
      raise ValueError(f"{len(token_predictions)} predicted rows for {len(self.first_token)} "
                       "examples")
    out = []
    for first, pred in zip(self.first_token, token_predictions):
      pred = np.asarray(pred)
      words = np.full(len(first), self.outside_id, np.int32)
      ok = first >= 0
      words[ok] = pred[first[ok]]
      out.append(words)
    return out


@dataclasses.dataclass
class DataBundle:
  """info: the task. train: TrainBatcher (or MergedBatcher with "unlabeled/" keys), with
  steps_per_epoch, batch_at(step), state_dict()/from_state_dict(); None when built without a train
  split. eval: split -> callable returning a fresh iterator of eval batches. stats: flat
  "<split>/<name>" numbers. ner: split -> WordAlignment (token classification only).
  examples / encoded: the raw and tokenized splits; unlabeled: the pool's texts (labels dropped).
  unlabeled_labels: the pool's true labels, for diagnostics only (pseudo-label accuracy); batched,
  as "unlabeled/labels", only with data.unlabeled_label_metrics, and never a target. notes: things the user should know (carved splits, truncation)."""

  info: TaskInfo
  train: batching.TrainBatcher | batching.MergedBatcher | None
  eval: dict[str, Callable[[], Iterator[batching.Batch]]]
  stats: dict[str, float]
  ner: dict[str, WordAlignment]
  examples: dict[str, Examples]
  encoded: dict[str, tokenize.Encoded]
  unlabeled: Examples | None
  boundaries: tuple[int, ...]
  notes: list[str]
  unlabeled_labels: list | None = None
  geometry: packing_lib.Geometry | None = None  # packed batches' R x L x E; None: buckets


def cache_dir(data_config) -> pathlib.Path:
  return pathlib.Path(cfg_get(data_config, "cache_dir", "") or assets.cache_dir() / "tokenized")


def build(data_config, tokenizer, *, batch_size: int, eval_batch_size: int, seed: int,
          num_shards: int = 1, unlabeled_ratio: float = 0, drop_remainder: bool = True,
          with_train: bool = True, shards: Sequence[int] | None = None,
          packing: bool | None = None) -> DataBundle:
  """See the module docstring. unlabeled_ratio (mu) > 0 merges an unlabeled batch of
  round(batch_size * mu) rows into every train batch (needs data.labeled_per_class > 0).
  num_shards: the devices every batch is split over. shards: which of them this process feeds;
  None: this JAX process's share (`local_shards`), every row on one process. packing: None reads
  data.packing; batch_size and eval_batch_size then count examples, not rows."""
  batching.check_shards(batch_size, num_shards)
  batching.check_shards(eval_batch_size, num_shards, "eval_batch_size")
  if shards is None:
    shards = local_shards(num_shards)
  max_length = int(cfg_get(data_config, "max_length", 128))
  model_max = getattr(tokenizer, "model_max_length", None)
  if model_max is not None and model_max < 10**6 and max_length > model_max:
    raise DataError(f"data.max_length={max_length} exceeds the tokenizer's model_max_length "
                    f"{model_max}. Fix: --config.data.max_length={model_max} or less.")
  train_split = cfg_get(data_config, "train_split", "train") or "train"
  eval_splits = as_list(cfg_get(data_config, "eval_split", "validation"))
  splits = list(dict.fromkeys(([train_split] if with_train else []) + eval_splits))
  info, examples = tasks.load(data_config, splits)
  notes = [f"{s}: {ex.source}" for s, ex in examples.items() if "seeded" in ex.source]

  k = int(cfg_get(data_config, "labeled_per_class", 0) or 0)
  n_train_max = int(cfg_get(data_config, "max_train_examples", 0) or 0)
  n_eval_max = int(cfg_get(data_config, "max_eval_examples", 0) or 0)
  unlabeled = unlabeled_labels = None
  pseudo = str(cfg_get(data_config, "pseudo_labels", "") or "")
  label_metrics = bool(cfg_get(data_config, "unlabeled_label_metrics", False))
  if pseudo and not k:
    raise DataError(f"data.pseudo_labels={pseudo!r} labels rows of the unlabeled pool: set "
                    "data.labeled_per_class > 0 as in the run that wrote it")
  if with_train:
    train = examples[train_split]
    if train.labels is None:
      raise DataError(f"the train split {train_split!r} ({train.source}) has no labels")
    if n_train_max:
      train = train.select(range(min(n_train_max, len(train))))
    if k:
      if info.kind != "classification":
        raise DataError(f"data.labeled_per_class={k} needs a classification task; "
                        f"{info.name} is {info.kind}")
      labeled, rest = tasks.subset_per_class(train.labels, k, info.num_labels, seed)
      pool = train.select(rest)
      unlabeled, unlabeled_labels = dataclasses.replace(pool, labels=None), pool.labels
      train = train.select(labeled)
      notes.append(f"semi-supervised: {len(train)} labeled ({k} per class, seed {seed}), "
                   f"{len(unlabeled)} unlabeled")
      if pseudo:
        rows, labels = pseudo_labels.load(pseudo, unlabeled, info.num_labels)
        train = pseudo_labels.extend(train, unlabeled, rows, labels)
        notes.append(f"{len(rows)} pseudo-labeled pool rows from {pseudo} join the labeled ones")
    examples[train_split] = train
  if unlabeled_ratio and unlabeled is None:
    raise DataError("unlabeled_ratio > 0 needs an unlabeled pool: set data.labeled_per_class > 0")
  for s in eval_splits:
    if n_eval_max and s != train_split:
      examples[s] = examples[s].select(range(min(n_eval_max, len(examples[s]))))

  tok_id = tokenize.tokenizer_fingerprint(tokenizer)
  encode = functools.partial(tokenize.encode, tokenizer=tokenizer, kind=info.kind,
                             max_length=max_length, cache_dir=cache_dir(data_config),
                             tokenizer_id=tok_id)
  encoded = {s: encode(ex) for s, ex in examples.items()}
  boundaries = batching.parse_boundaries(cfg_get(data_config, "bucket_boundaries", ""), max_length)
  if packing is None:
    packing = bool(cfg_get(data_config, "packing", False))
  stats: dict[str, float] = {}
  for s, enc in encoded.items():
    stats.update({f"{s}/{key}": v for key, v in enc.stats().items()})
    if enc.truncated.any():
      notes.append(f"{s}: {int(enc.truncated.sum())} of {len(enc)} examples truncated to "
                   f"{max_length} tokens")

  train_batcher = geometry = None
  eval_lengths = [encoded[s].lengths for s in eval_splits]
  if packing and not with_train:
    geometry = packing_lib.eval_geometry(eval_lengths, eval_batch_size=eval_batch_size,
                                         max_length=max_length, num_shards=num_shards)
  if with_train:
    enc = encoded[train_split]
    if packing:
      steps = len(enc) // batch_size if drop_remainder else -(-len(enc) // batch_size)
      geometry = packing_lib.choose_geometry(
          enc.lengths, batch_size=batch_size, max_length=max_length, steps=max(steps, 1),
          num_shards=num_shards, seed=seed, eval_lengths=eval_lengths,
          eval_batch_size=eval_batch_size)
      layout = ("packed", dataclasses.asdict(geometry))
      train_batcher = packing_lib.PackedTrainBatcher(
          enc, batch_size=batch_size, seed=seed, geometry=geometry, num_shards=num_shards,
          drop_remainder=drop_remainder, shards=shards,
          fingerprint=_fingerprint(examples[train_split], tok_id, max_length, batch_size,
                                   layout, drop_remainder))
      stats[f"{train_split}/padding_fraction"] = train_batcher.padding_fraction(0)
      stats[f"{train_split}/examples_per_row"] = train_batcher.examples_per_row(0)
      stats[f"{train_split}/packed_rows"] = geometry.rows
      stats[f"{train_split}/packed_length"] = geometry.length
      stats[f"{train_split}/packed_slots"] = geometry.slots
      stats[f"{train_split}/packing_overflow"] = train_batcher.overflow[0]
    else:
      fingerprint = _fingerprint(examples[train_split], tok_id, max_length, batch_size,
                                 boundaries, drop_remainder)
      train_batcher = batching.TrainBatcher(
          enc, batch_size=batch_size, seed=seed, boundaries=boundaries, num_shards=num_shards,
          drop_remainder=drop_remainder, fingerprint=fingerprint, shards=shards)
      stats[f"{train_split}/padding_fraction"] = batching.padding_fraction(
          enc.lengths, train_batcher.epoch_plan(0))
    stats[f"{train_split}/steps_per_epoch"] = train_batcher.steps_per_epoch
    if unlabeled is not None:
      # With data.unlabeled_label_metrics the pool keeps its true labels, batched as
      # "unlabeled/labels" for the pseudo-label accuracy metrics only.
      u_enc = encode(dataclasses.replace(unlabeled, labels=unlabeled_labels)
                     if label_metrics else unlabeled)
      encoded["unlabeled"] = u_enc
      stats.update({f"unlabeled/{key}": v for key, v in u_enc.stats().items()})
    if unlabeled_ratio:
      u_size = int(round(batch_size * unlabeled_ratio))
      batching.check_shards(u_size, num_shards, f"batch_size * unlabeled_ratio ({u_size})")
      u_drop = len(u_enc) >= u_size
      if packing:
        u_steps = len(u_enc) // u_size if u_drop else 1
        u_geometry = packing_lib.choose_geometry(
            u_enc.lengths, batch_size=u_size, max_length=max_length, steps=u_steps,
            num_shards=num_shards, seed=seed)
        u_batcher = packing_lib.PackedTrainBatcher(
            u_enc, batch_size=u_size, seed=seed, geometry=u_geometry, num_shards=num_shards,
            drop_remainder=u_drop, stream=1, shards=shards,
            fingerprint=_fingerprint(unlabeled, tok_id, max_length, u_size,
                                     ("packed", dataclasses.asdict(u_geometry)), True))
        stats["unlabeled/padding_fraction"] = u_batcher.padding_fraction(0)
        stats["unlabeled/packed_rows"] = u_geometry.rows
        stats["unlabeled/packed_length"] = u_geometry.length
      else:
        u_batcher = batching.TrainBatcher(
            u_enc, batch_size=u_size, seed=seed, boundaries=boundaries, num_shards=num_shards,
            drop_remainder=u_drop, stream=1, shards=shards,
            fingerprint=_fingerprint(unlabeled, tok_id, max_length, u_size, boundaries, True))
      train_batcher = batching.MergedBatcher(train_batcher, u_batcher, keep_labels=label_metrics)

  evals = {}
  for s in eval_splits:
    enc = encoded[s]
    if packing:
      plan = packing_lib.eval_plan(enc, geometry, num_shards)
      evals[s] = functools.partial(packing_lib.eval_batches, enc, geometry=geometry,
                                   num_shards=num_shards, shards=shards, plan=plan)
      stats[f"{s}/padding_fraction"] = packing_lib.padding_fraction(
          enc, [lay for parts in plan for lay in parts], geometry.eval_rows // num_shards,
          geometry.length)
      stats[f"{s}/packed_rows"] = geometry.eval_rows
      continue
    evals[s] = functools.partial(batching.eval_batches, enc, batch_size=eval_batch_size,
                                 boundaries=boundaries, num_shards=num_shards, shards=shards)
    chunks = [(np.arange(a, min(a + eval_batch_size, len(enc))), 0)
              for a in range(0, len(enc), eval_batch_size)]
    chunks = [(np.concatenate([r, np.full(eval_batch_size - len(r), -1)]),
               batching.bucket_length(enc.lengths[r], boundaries)) for r, _ in chunks]
    stats[f"{s}/padding_fraction"] = batching.padding_fraction(enc.lengths, chunks)

  ner = {}
  if info.kind == "token_classification":
    for s in eval_splits:
      ner[s] = WordAlignment.from_encoded(encoded[s], examples[s], info.label_names)
      stats[f"{s}/n_words_without_token"] = ner[s].n_words_without_token
  return DataBundle(info, train_batcher, evals, stats, ner, examples, encoded, unlabeled,
                    boundaries, notes, unlabeled_labels, geometry)


def local_shards(num_shards: int) -> tuple[int, ...] | None:
  """This JAX process's shards of a batch split over num_shards devices (pass them as `shards` to
  batching.eval_batches / TrainBatcher when building batches outside `build`); None on one
  process. Asks JAX only when the batch is split (num_shards > 1): by then the mesh exists, so
  the question starts no backend."""
  if num_shards == 1:
    return None
  import jax  # the data layer is numpy; only which rows a process builds is JAX's to say
  if jax.process_count() == 1:
    return None
  return batching.process_shards(num_shards, jax.process_index(), jax.process_count())


def _fingerprint(train: Examples, tokenizer_id: str, max_length, batch_size, boundaries,
                 drop_remainder) -> str:
  """What fixes the batch at step s besides the seed: data, tokenization and batch geometry
  (`boundaries`: the bucket boundaries, or ("packed", geometry))."""
  parts = [train.fingerprint(), tokenizer_id, max_length, batch_size,
           list(boundaries), bool(drop_remainder)]
  return hashlib.sha256(json.dumps(parts).encode()).hexdigest()
