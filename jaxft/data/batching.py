"""Padded numpy batches from an `Encoded` split: length buckets, resumable train order, eval order.

Shapes. Every batch is padded to a bucket boundary S (the smallest boundary >= its longest row),
so a jitted step sees at most len(boundaries) shapes [B, S]. Keys (numpy):
  input_ids, attention_mask, token_type_ids: int32 [B, S]
  labels: int32 [B] | float32 [B] | int32 [B, S] (-100 = ignore); absent for unlabeled data
  example_mask: float32 [B], 0 for rows that only pad a short batch.

Train order (`TrainBatcher`). The batch at step s is a pure function of (seed, s): epoch
e = s // steps_per_epoch; a permutation from default_rng([seed, stream, e]); walking the buckets
from short to long, each bucket's examples (in permutation order, after the leftovers carried from
the shorter buckets) are cut into full batches and the leftover (< B) carries on to the next
bucket, which fits it; the batch order is then shuffled with the same rng. So an epoch has
floor(N / B) full batches (plus one padded batch of the final leftover when drop_remainder=False),
whatever the lengths. `state_dict()` is {step, seed, fingerprint}; resuming re-derives the order.

Eval order (`eval_batches`): consecutive chunks of B examples in file order, every example once;
the last chunk is padded with example_mask 0 rows.

Processes (`shards`). The global batch of B rows is cut into num_shards equal shards, one per
device, in device order. A process that holds the devices of `shards` builds only those rows
(B * len(shards) / num_shards of them, in shard order); which rows and the bucket length S still
come from the whole global batch, so every process agrees on S and the rows the processes build,
put side by side, are the one-process batch. shards=None: all of them (one process).
"""

from __future__ import annotations

import collections
import queue
import threading
from typing import Iterable, Iterator, Sequence

import numpy as np

from jaxft.data.tasks import IGNORE
from jaxft.data.tokenize import Encoded

Batch = dict[str, np.ndarray]


def parse_boundaries(spec, max_length: int) -> tuple[int, ...]:
  """'32,64,128' -> (32, 64, 128); '' -> powers of two from 8 below max_length, then max_length.
  max_length is appended when the list stops short of it, so every example has a bucket."""
  if isinstance(spec, str):
    try:
      values = [int(v) for v in spec.split(",") if v.strip()]
    except ValueError:
      raise ValueError(f"data.bucket_boundaries={spec!r}: expected comma-separated integers "
                       "like '32,64,128' (or '' for powers of two)") from None
  else:
    values = [int(v) for v in (spec or ())]
  if not values:
    values, b = [], 8
    while b < max_length:
      values.append(b)
      b *= 2
  if any(v <= 0 for v in values) or sorted(set(values)) != values:
    raise ValueError(f"bucket boundaries must be positive and strictly increasing, got {values}")
  if values[-1] > max_length:
    raise ValueError(f"bucket boundary {values[-1]} exceeds data.max_length={max_length}")
  if values[-1] < max_length:
    values.append(max_length)
  return tuple(values)


def check_shards(batch_size: int, num_shards: int, what: str = "batch_size") -> None:
  if batch_size <= 0:
    raise ValueError(f"{what} must be positive, got {batch_size}")
  if num_shards <= 0 or batch_size % num_shards:
    raise ValueError(f"{what}={batch_size} is not divisible by the {num_shards} devices it is "
                     f"sharded over. Fix: use a multiple of {num_shards}.")


def shard_rows(batch_size: int, num_shards: int, shards: Sequence[int] | None) -> np.ndarray:
  """Positions in a batch of batch_size rows that the shards `shards` (of num_shards equal
  ones) hold, in shard order: int [batch_size * len(shards) / num_shards]. None: every row."""
  check_shards(batch_size, num_shards)
  if shards is None:
    return np.arange(batch_size)
  shards = [int(k) for k in shards]
  if not shards or sorted(set(shards)) != shards or shards[0] < 0 or shards[-1] >= num_shards:
    raise ValueError(f"shards={shards} must be increasing shard positions in [0, {num_shards})")
  per = batch_size // num_shards
  return np.concatenate([np.arange(k * per, (k + 1) * per) for k in shards])


def process_shards(num_shards: int, process_index: int, process_count: int) -> tuple[int, ...]:
  """The shards process `process_index` of `process_count` holds when each process holds the same
  number of consecutive devices (jaxft.train.mesh.make_mesh orders devices by process)."""
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process {process_index} of {process_count} does not exist")
  if num_shards % process_count:
    raise ValueError(f"{num_shards} devices do not split evenly over {process_count} processes")
  per = num_shards // process_count
  return tuple(range(process_index * per, (process_index + 1) * per))


def make_batch(enc: Encoded, indices: np.ndarray, seq_len: int) -> Batch:
  """Rows `indices` (-1 = padding row) of `enc`, padded to [len(indices), seq_len]."""
  b = len(indices)
  input_ids = np.full((b, seq_len), enc.pad_id, np.int32)
  attention = np.zeros((b, seq_len), np.int32)
  types = np.zeros((b, seq_len), np.int32)
  token_labels = enc.labels is not None and enc.kind == "token_classification"
  if token_labels:
    labels = np.full((b, seq_len), IGNORE, np.int32)
  elif enc.labels is not None:
    labels = np.zeros((b,), enc.labels.dtype)
  for r, i in enumerate(indices):
    if i < 0:
      continue
    sl = enc.row(int(i))
    n = sl.stop - sl.start
    if n > seq_len:
      raise ValueError(f"example {i} has {n} tokens, more than the bucket length {seq_len}")
    input_ids[r, :n] = enc.input_ids[sl]
    attention[r, :n] = 1
    types[r, :n] = enc.token_type_ids[sl]
    if token_labels:
      labels[r, :n] = enc.labels[sl]
    elif enc.labels is not None:
      labels[r] = enc.labels[i]
  batch = {"input_ids": input_ids, "attention_mask": attention, "token_type_ids": types,
           "example_mask": (np.asarray(indices) >= 0).astype(np.float32)}
  if enc.labels is not None:
    batch["labels"] = labels
  return batch


def bucket_length(lengths: np.ndarray, boundaries: Sequence[int]) -> int:
  """The smallest boundary >= the longest of `lengths`."""
  longest = int(lengths.max()) if len(lengths) else 1
  k = int(np.searchsorted(np.asarray(boundaries), longest, side="left"))
  if k == len(boundaries):
    raise ValueError(f"a row of {longest} tokens exceeds the last bucket {boundaries[-1]}")
  return int(boundaries[k])


class TrainBatcher:
  """Deterministic, resumable train batches; see the module docstring for the order.

  Iterating yields batch_at(step) and advances `step`. stream: a second independent order with
  the same seed (the unlabeled pool uses stream 1). shards: the shards of the global batch this
  process builds (module docstring); batch_at and indices_at return only their rows.
  """

  def __init__(self, enc: Encoded, *, batch_size: int, seed: int, boundaries: Sequence[int],
               num_shards: int = 1, drop_remainder: bool = True, fingerprint: str = "",
               stream: int = 0, step: int = 0, shards: Sequence[int] | None = None):
    self._local = shard_rows(batch_size, num_shards, shards)
    self.enc, self.batch_size, self.seed = enc, int(batch_size), int(seed)
    self.boundaries, self.num_shards = tuple(boundaries), num_shards
    self.shards = None if shards is None else tuple(int(k) for k in shards)
    self.drop_remainder, self.fingerprint, self.stream = drop_remainder, fingerprint, stream
    self.step = int(step)
    n = self.num_examples = len(enc)
    self.steps_per_epoch = n // batch_size if drop_remainder else -(-n // batch_size)
    if self.steps_per_epoch == 0:
      raise ValueError(f"{n} training examples make no full batch of {batch_size}. Fix: lower "
                       "train.batch_size, or train on more examples (data.max_train_examples, "
                       "data.labeled_per_class); in code, drop_remainder=False.")
    lengths = enc.lengths
    self._bucket = np.searchsorted(np.asarray(self.boundaries), lengths, side="left")
    if len(lengths) and self._bucket.max() >= len(self.boundaries):
      raise ValueError(f"a training example of {lengths.max()} tokens exceeds the last bucket "
                       f"{self.boundaries[-1]}")
    self._plans: collections.OrderedDict[int, list] = collections.OrderedDict()

  @property
  def shapes(self) -> list[tuple[int, int]]:
    """Every global [B, S] a batch can have: at most len(boundaries)."""
    return [(self.batch_size, s) for s in self.boundaries]

  def epoch_plan(self, epoch: int) -> list[tuple[np.ndarray, int]]:
    """The epoch's global batches, in step order: (example indices [B], -1 = padding; S)."""
    if epoch in self._plans:
      self._plans.move_to_end(epoch)
      return self._plans[epoch]
    rng = np.random.default_rng([self.seed, self.stream, epoch])
    perm = rng.permutation(len(self.enc))
    by_bucket = self._bucket[perm]
    lengths = self.enc.lengths
    batches, carry, bsz = [], perm[:0], self.batch_size
    for b in range(len(self.boundaries)):
      members = np.concatenate([carry, perm[by_bucket == b]])
      full = len(members) // bsz
      for j in range(full):
        rows = members[j * bsz:(j + 1) * bsz]
        batches.append((rows, bucket_length(lengths[rows], self.boundaries)))
      carry = members[full * bsz:]
    if len(carry) and not self.drop_remainder:
      rows = np.concatenate([carry, np.full(bsz - len(carry), -1, carry.dtype)])
      batches.append((rows, bucket_length(lengths[carry], self.boundaries)))
    order = rng.permutation(len(batches))
    plan = [batches[i] for i in order]
    self._plans[epoch] = plan
    while len(self._plans) > 2:  # this epoch and the previous one cover any resume pattern
      self._plans.popitem(last=False)
    return plan

  def indices_at(self, step: int) -> tuple[np.ndarray, int]:
    """(example indices with -1 for padding rows, bucket length S) of this process's rows of the
    batch at `step`: [B] on one process, [B * len(shards) / num_shards] with shards."""
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}")
    epoch, k = divmod(int(step), self.steps_per_epoch)
    rows, seq_len = self.epoch_plan(epoch)[k]
    return rows[self._local], seq_len

  def batch_at(self, step: int) -> Batch:
    rows, seq_len = self.indices_at(step)
    return make_batch(self.enc, rows, seq_len)

  def __iter__(self) -> Iterator[Batch]:
    return self

  def __next__(self) -> Batch:
    batch = self.batch_at(self.step)
    self.step += 1
    return batch

  def state_dict(self) -> dict:
    return {"step": self.step, "seed": self.seed, "fingerprint": self.fingerprint}

  def from_state_dict(self, state: dict) -> "TrainBatcher":
    """A batcher positioned at state['step'] with state['seed']; refuses other data."""
    _check_fingerprint(state, self.fingerprint)
    return TrainBatcher(self.enc, batch_size=self.batch_size, seed=int(state["seed"]),
                        boundaries=self.boundaries, num_shards=self.num_shards,
                        drop_remainder=self.drop_remainder, fingerprint=self.fingerprint,
                        stream=self.stream, step=int(state["step"]), shards=self.shards)


def _check_fingerprint(state: dict, expected: str) -> None:
  got = state.get("fingerprint", "")
  if got != expected:
    raise ValueError(f"the checkpoint's data iterator was saved on different data (fingerprint "
                     f"{got[:12]}... vs {expected[:12]}... now): the batch order would not match. "
                     "Fix: resume with the same data config, or start a new workdir.")


class MergedBatcher:
  """Labeled batches plus an unlabeled batch of batch_size * mu rows under "unlabeled/" keys.

  Both parts are padded to the same S (the longer of their buckets), so shapes stay within
  len(boundaries); packed parts (jaxft.data.packing) keep each its own R x L. The unlabeled order is its own TrainBatcher (stream 1) indexed by the same
  step, cycling through the pool at its own epoch length.
  """

  def __init__(self, labeled: TrainBatcher, unlabeled: TrainBatcher, prefix: str = "unlabeled/",
               keep_labels: bool = False):
    self.labeled, self.unlabeled, self.prefix = labeled, unlabeled, prefix
    self.keep_labels = keep_labels  # the pool's true labels as "<prefix>labels" (diagnostics)
    self.steps_per_epoch = labeled.steps_per_epoch
    self.num_examples = labeled.num_examples
    self.fingerprint = labeled.fingerprint + ":" + unlabeled.fingerprint

  @property
  def step(self) -> int:
    return self.labeled.step

  @property
  def seed(self) -> int:
    return self.labeled.seed

  @property
  def shapes(self):
    return self.labeled.shapes

  def batch_at(self, step: int) -> Batch:
    if hasattr(self.labeled, "geometry"):  # packed (jaxft.data.packing): each part its own shape
      batch, ub = self.labeled.batch_at(step), self.unlabeled.batch_at(step)
    else:
      rows, s_l = self.labeled.indices_at(step)
      urows, s_u = self.unlabeled.indices_at(step)
      seq_len = max(s_l, s_u)
      batch = make_batch(self.labeled.enc, rows, seq_len)
      ub = make_batch(self.unlabeled.enc, urows, seq_len)
    batch.update({self.prefix + k: v for k, v in ub.items() if k != "labels" or self.keep_labels})
    return batch

  def __iter__(self):
    return self

  def __next__(self) -> Batch:
    batch = self.batch_at(self.step)
    self.labeled.step += 1
    self.unlabeled.step += 1
    return batch

  def state_dict(self) -> dict:
    return {"step": self.step, "seed": self.seed, "fingerprint": self.fingerprint}

  def from_state_dict(self, state: dict) -> "MergedBatcher":
    _check_fingerprint(state, self.fingerprint)
    sub = lambda b: b.from_state_dict({**state, "fingerprint": b.fingerprint})
    return MergedBatcher(sub(self.labeled), sub(self.unlabeled), self.prefix, self.keep_labels)


def eval_batches(enc: Encoded, *, batch_size: int, boundaries: Sequence[int],
                 num_shards: int = 1, shards: Sequence[int] | None = None) -> Iterator[Batch]:
  """Every example once, in order, in chunks of batch_size; the last chunk padded with rows of
  example_mask 0. Each chunk is padded to its own bucket length. With `shards`, only this
  process's rows of each chunk (module docstring)."""
  check_shards(batch_size, num_shards, "eval_batch_size")
  local = shard_rows(batch_size, num_shards, shards)
  lengths = enc.lengths
  for start in range(0, len(enc), batch_size):
    rows = np.arange(start, min(start + batch_size, len(enc)))
    seq_len = bucket_length(lengths[rows], boundaries)
    if len(rows) < batch_size:
      rows = np.concatenate([rows, np.full(batch_size - len(rows), -1, rows.dtype)])
    yield make_batch(enc, rows[local], seq_len)


def padding_fraction(lengths: np.ndarray, batches: Iterable[tuple[np.ndarray, int]]) -> float:
  """1 - real tokens / (B * S) summed over batches (padding rows count as padding)."""
  real = total = 0
  for rows, seq_len in batches:
    real += int(lengths[rows[rows >= 0]].sum())
    total += len(rows) * seq_len
  return 1.0 - real / total if total else 0.0


class _Failure:

  def __init__(self, error: BaseException):
    self.error = error


class Prefetcher:
  """Builds the next `size` items of an iterator on a background thread (numpy padding overlaps
  the device step). Exceptions re-raise in the consumer; close() stops the thread."""

  _END = object()

  def __init__(self, iterator: Iterable, size: int = 2):
    self._it = iter(iterator)
    self._queue: queue.Queue = queue.Queue(maxsize=max(1, size))
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True, name="jaxft-prefetch")
    self._thread.start()

  def _run(self):
    try:
      for item in self._it:
        if not self._put(item):
          return
      self._put(self._END)
    except BaseException as e:  # handed to the consumer, which raises it
      self._put(_Failure(e))

  def _put(self, item) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def __iter__(self):
    return self

  def __next__(self):
    item = self._queue.get()
    if item is self._END:
      self._queue.put(self._END)
      raise StopIteration
    if isinstance(item, _Failure):
      raise item.error
    return item

  def close(self):
    self._stop.set()
    self._thread.join(timeout=5)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
