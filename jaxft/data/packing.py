"""Packed batches: several whole examples per row, so the step computes almost no padding.

A packed batch has R rows of L tokens and E example slots (numpy; static shapes, one compile):
  input_ids, attention_mask, token_type_ids: int32 [R, L]
  segment_ids: int32 [R, L], e + 1 at the tokens of slot e, 0 at padding (unique over the batch)
  position_ids: int32 [R, L], 0..n_e - 1 inside every example (each family applies its own rule:
    RoBERTa adds padding_idx + 1, MPNet / DeBERTa take relative positions, ModernBERT rotates)
  example_start: int32 [E], the flat index r * L + offset of slot e's first token (0 if unused)
  labels: [E] (sequence tasks) | int32 [R, L] (token tasks, -100 at padding); none if unlabeled
  example_mask: float32 [E], 0 for unused slots.
The model attends block-diagonally (jaxft.models.layers.Packing) and pools per example, so a
sequence head returns [E, C] and every loss and metric is one over examples, as for padded rows.

Train order (`PackedTrainBatcher`), a pure function of (seed, step) like batching.TrainBatcher:
epoch e draws a permutation from default_rng([seed, stream, e]); with drop_remainder its last
N mod B examples sit the epoch out. The rest are sorted by length (stably, so equal lengths keep
the random order) and dealt in rounds of K = steps_per_epoch: each round's K examples go to the
K batches in a fresh random order. Every batch so gets B examples, one from each length
stratum, and all batches hold nearly the same number of tokens, which lets a tight R x L fit
them. Each batch is laid out first-fit decreasing into its R rows; an example that does not fit
moves on to the next batch (E = B + B // 8 + 1 slots leave room for it) and one still left at
the epoch's end sits the epoch out (counted in `overflow`; R is chosen so that epoch 0 has none).

Geometry (`choose_geometry`): L is a multiple of 8 no shorter than the longest example (and no
longer than max_length); R is the fewest rows that fit every batch of the first epochs; among
the candidate L the one with the fewest R x L tokens wins. Eval batches (`eval_plan`) take
consecutive examples, as many as fit R_e rows (sized for eval_batch_size examples), so results
come back in file order.

Shards: a batch's rows and slots are cut into num_shards equal parts, part k on device k; each
part is packed on its own, so a device's rows hold only its own slots, and a process builds only
its shards' rows and slots (with global slot ids and start indices).
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Iterator, Sequence

import numpy as np

from jaxft.data.batching import Batch, check_shards, shard_rows, _check_fingerprint
from jaxft.data.tasks import IGNORE
from jaxft.data.tokenize import Encoded


PACKING_KEYS = ("segment_ids", "position_ids", "example_start")


@dataclasses.dataclass(frozen=True)
class Geometry:
  """rows R, length L, slots E of a packed train batch; eval_rows R_e, eval_slots E_e."""

  rows: int
  length: int
  slots: int
  eval_rows: int = 0
  eval_slots: int = 0

  @property
  def tokens(self) -> int:
    return self.rows * self.length


@dataclasses.dataclass
class Layout:
  """Where a batch's examples sit: example [E] (-1 = unused slot), row [E], offset [E]."""

  example: np.ndarray
  row: np.ndarray
  offset: np.ndarray


def first_fit_decreasing(lengths: np.ndarray, rows: int, length: int, max_items: int = 0):
  """Places items (longest first, ties in the given order) into `rows` rows of `length` tokens,
  at most max_items of them (0: no cap). -> (row [n], -1 where an item was not placed; offset)."""
  n = len(lengths)
  row = np.full(n, -1, np.int64)
  offset = np.zeros(n, np.int64)
  free = np.full(rows, length, np.int64)
  placed = 0
  for i in np.argsort(-np.asarray(lengths), kind="stable"):
    if max_items and placed == max_items:
      break
    ok = np.flatnonzero(free >= lengths[i])
    if len(ok):
      placed += 1
      r = ok[0]
      row[i], offset[i] = r, length - free[r]
      free[r] -= lengths[i]
  return row, offset


def rows_needed(lengths: np.ndarray, length: int) -> int:
  """The rows first-fit decreasing fills with these items (each <= length)."""
  free: list[int] = []
  for ell in sorted((int(x) for x in lengths), reverse=True):
    for r, f in enumerate(free):
      if f >= ell:
        free[r] -= ell
        break
    else:
      free.append(length - ell)
  return len(free)


def deal(lengths: np.ndarray, perm: np.ndarray, parts: int, rng) -> list[np.ndarray]:
  """The examples `perm` dealt into `parts` equal groups, one per length stratum (module
  docstring); len(perm) must be a multiple of parts."""
  order = perm[np.argsort(lengths[perm], kind="stable")]
  rounds = order.reshape(-1, parts)
  assign = np.argsort(rng.random(rounds.shape), axis=1)  # a random permutation per round
  dealt = np.take_along_axis(rounds, assign, axis=1)
  return [dealt[:, j] for j in range(parts)]


def _epoch_groups(lengths, seed, stream, epoch, steps, per_step, num_shards):
  """The epoch's examples in groups: [steps * num_shards] arrays, group s * num_shards + k is
  shard k of step s."""
  rng = np.random.default_rng([seed, stream, epoch])
  perm = rng.permutation(len(lengths))
  used = steps * per_step * num_shards
  if used < len(perm):  # drop_remainder: the last N mod B sit this epoch out
    perm = perm[:used]
  elif used > len(perm):  # drop_remainder=False: the groups are filled up with empty places
    perm = np.concatenate([perm, np.full(used - len(perm), -1, perm.dtype)])
  ell = np.concatenate([lengths, [0]])  # index -1 reads length 0
  groups = deal(ell, perm, steps * num_shards, rng)
  return [g[g >= 0] for g in groups]


def choose_geometry(lengths: np.ndarray, *, batch_size: int, max_length: int, steps: int,
                    num_shards: int = 1, seed: int = 0, epochs: int = 2,
                    eval_lengths: Sequence[np.ndarray] = (), eval_batch_size: int = 0) -> Geometry:
  """R, L and E for this data (module docstring): the fewest R x L tokens that fit every batch
  of the first `epochs` epochs, R a multiple of num_shards."""
  lengths = np.asarray(lengths)
  longest = int(max([lengths.max()] + [int(e.max()) for e in eval_lengths if len(e)]))
  per_step = batch_size // num_shards
  lo = min(max_length, -(-longest // 8) * 8)
  candidates = sorted({min(max_length, v) for v in range(lo, 2 * lo + 1, 8)})
  groups = [g for e in range(epochs)
            for g in _epoch_groups(lengths, seed, 0, e, steps, per_step, num_shards)]
  best = None
  for length in candidates:
    need = max(rows_needed(lengths[g], length) for g in groups) * num_shards
    if best is None or need * length < best[0] * best[1]:
      best = (need, length)
  rows, length = best
  slots = batch_size + num_shards * (per_step // 8 + 1)
  geometry = Geometry(rows, length, slots)
  if eval_batch_size:
    geometry = choose_eval_rows(geometry, eval_lengths or [lengths], eval_batch_size, num_shards)
  return geometry


def eval_geometry(eval_lengths: Sequence[np.ndarray], *, eval_batch_size: int, max_length: int,
                  num_shards: int = 1) -> Geometry:
  """Packed eval batches without a train split (`jaxft eval`): L the smallest multiple of 8 that
  holds the longest eval example (at most max_length), R_e by choose_eval_rows."""
  longest = max([1] + [int(np.max(e)) for e in eval_lengths if len(e)])
  length = min(max_length, -(-longest // 8) * 8)
  return choose_eval_rows(Geometry(0, length, 0), eval_lengths, eval_batch_size, num_shards)


def choose_eval_rows(geometry: Geometry, eval_lengths: Sequence[np.ndarray], eval_batch_size: int,
                     num_shards: int = 1) -> Geometry:
  """Eval rows R_e near eval_batch_size examples' worth of tokens, the one (within -25% / +25%)
  whose eval_plan over `eval_lengths` computes the fewest tokens."""
  ev = np.concatenate([np.asarray(e) for e in eval_lengths])
  mean = float(ev.mean()) if len(ev) else 1.0
  base = max(1, math.ceil(eval_batch_size / num_shards * mean / geometry.length))
  best = None
  for per in sorted({max(1, int(base * f)) for f in np.linspace(0.75, 1.25, 11)}):
    g = dataclasses.replace(geometry, eval_rows=per * num_shards, eval_slots=eval_batch_size)
    cost = sum(len(eval_plan(_Lengths(e), g, num_shards)) * per for e in eval_lengths)
    if best is None or cost < best[0]:
      best = (cost, g)
  return best[1]


class _Lengths:
  """Just the lengths of a split, what eval_plan reads."""

  def __init__(self, lengths):
    self.lengths = np.asarray(lengths)


def _layout_parts(lengths, groups, rows_per, slots_per, length):
  """Lays each group (after the examples carried from the one before) out in rows_per rows and
  at most slots_per slots; -> ([Layout]..., examples still waiting after the last group)."""
  layouts, carry = [], np.zeros(0, np.int64)
  for g in groups:
    members = np.concatenate([carry, g]).astype(np.int64)
    row, off = first_fit_decreasing(lengths[members], rows_per, length, slots_per)
    placed = np.flatnonzero(row >= 0)
    carry = members[row < 0]
    ex = np.full(slots_per, -1, np.int64)
    r = np.zeros(slots_per, np.int64)
    o = np.zeros(slots_per, np.int64)
    ex[:len(placed)], r[:len(placed)], o[:len(placed)] = members[placed], row[placed], off[placed]
    layouts.append(Layout(ex, r, o))
  return layouts, len(carry)


def pack(enc: Encoded, layouts: Sequence[Layout], *, rows_per: int, length: int,
         part_index: Sequence[int]) -> Batch:
  """The batch of the parts `layouts` (each rows_per rows, len(layout.example) slots), which are
  parts `part_index` of the global batch: global slot ids and start indices (module docstring)."""
  slots_per = len(layouts[0].example)
  n_rows, n_slots = rows_per * len(layouts), slots_per * len(layouts)
  example = np.concatenate([lay.example for lay in layouts])
  part = np.repeat(np.asarray(part_index, np.int64), slots_per)
  local = np.repeat(np.arange(len(layouts)), slots_per)
  row = np.concatenate([lay.row for lay in layouts])
  offset = np.concatenate([lay.offset for lay in layouts])
  real = np.flatnonzero(example >= 0)
  ex = example[real]
  n = (enc.offsets[ex + 1] - enc.offsets[ex]).astype(np.int64)
  within = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)  # 0..n_e - 1 per example
  src = np.repeat(enc.offsets[ex].astype(np.int64), n) + within
  dest = np.repeat((local[real] * rows_per + row[real]) * length + offset[real], n) + within
  global_slot = part * slots_per + np.tile(np.arange(slots_per), len(layouts))

  def grid(fill, values, dtype=np.int32):
    out = np.full(n_rows * length, fill, dtype)
    out[dest] = values
    return out.reshape(n_rows, length)

  segments = grid(0, np.repeat(global_slot[real] + 1, n))
  start = np.zeros(n_slots, np.int32)
  start[real] = (part[real] * rows_per + row[real]) * length + offset[real]
  mask = np.zeros(n_slots, np.float32)
  mask[real] = 1.0
  batch = {"input_ids": grid(enc.pad_id, enc.input_ids[src]),
           "attention_mask": (segments > 0).astype(np.int32),
           "token_type_ids": grid(0, enc.token_type_ids[src]), "segment_ids": segments,
           "position_ids": grid(0, within), "example_start": start, "example_mask": mask}
  if enc.labels is not None and enc.kind == "token_classification":
    batch["labels"] = grid(IGNORE, enc.labels[src])
  elif enc.labels is not None:
    labels = np.zeros((n_slots,), enc.labels.dtype)
    labels[real] = enc.labels[ex]
    batch["labels"] = labels
  return batch


def padding_fraction(enc: Encoded, layouts: Sequence[Layout], rows_per: int, length: int) -> float:
  """1 - real tokens / computed tokens over parts of rows_per rows."""
  lengths = enc.lengths
  real = sum(int(lengths[lay.example[lay.example >= 0]].sum()) for lay in layouts)
  total = len(layouts) * rows_per * length
  return 1.0 - real / total if total else 0.0


class PackedTrainBatcher:
  """Deterministic, resumable packed train batches with TrainBatcher's contract (steps_per_epoch,
  shapes, batch_at, indices_at, state_dict / from_state_dict); see the module docstring."""

  def __init__(self, enc: Encoded, *, batch_size: int, seed: int, geometry: Geometry,
               num_shards: int = 1, drop_remainder: bool = True, fingerprint: str = "",
               stream: int = 0, step: int = 0, shards: Sequence[int] | None = None):
    check_shards(batch_size, num_shards)
    check_shards(geometry.rows, num_shards, "packed rows")
    check_shards(geometry.slots, num_shards, "packed example slots")
    self.enc, self.batch_size, self.seed, self.geometry = enc, int(batch_size), int(seed), geometry
    self.num_shards = num_shards
    self.shards = None if shards is None else tuple(int(k) for k in shards)
    self._parts = list(range(num_shards)) if shards is None else list(self.shards)
    shard_rows(batch_size, num_shards, shards)  # validates shards
    self.drop_remainder, self.fingerprint, self.stream = drop_remainder, fingerprint, stream
    self.step = int(step)
    n = self.num_examples = len(enc)
    self.steps_per_epoch = n // batch_size if drop_remainder else -(-n // batch_size)
    if self.steps_per_epoch == 0:
      raise ValueError(f"{n} training examples make no full batch of {batch_size}. Fix: lower "
                       "train.batch_size, or train on more examples (data.max_train_examples, "
                       "data.labeled_per_class); in code, drop_remainder=False.")
    longest = int(enc.lengths.max()) if n else 0
    if longest > geometry.length:
      raise ValueError(f"a training example of {longest} tokens exceeds the packed row length "
                       f"{geometry.length}")
    self.overflow: dict[int, int] = {}
    self._plans: collections.OrderedDict[int, list] = collections.OrderedDict()

  @property
  def shapes(self) -> list[tuple[int, int]]:
    return [(self.geometry.rows, self.geometry.length)]

  def epoch_plan(self, epoch: int) -> list[list[Layout]]:
    """The epoch's batches in step order, each num_shards Layouts (one per part)."""
    if epoch in self._plans:
      self._plans.move_to_end(epoch)
      return self._plans[epoch]
    g, n = self.geometry, self.num_shards
    lengths = self.enc.lengths.astype(np.int64)
    groups = _epoch_groups(lengths, self.seed, self.stream, epoch, self.steps_per_epoch,
                           self.batch_size // n, n)
    per_part = [groups[k::n] for k in range(n)]  # shard k's groups in step order
    laid, dropped = [], 0
    for k in range(n):
      lay, d = _layout_parts(lengths, per_part[k], g.rows // n, g.slots // n, g.length)
      laid.append(lay)
      dropped += d
    self.overflow[epoch] = dropped
    plan = [[laid[k][s] for k in range(n)] for s in range(self.steps_per_epoch)]
    self._plans[epoch] = plan
    while len(self._plans) > 2:
      self._plans.popitem(last=False)
    return plan

  def layouts_at(self, step: int) -> list[Layout]:
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}")
    epoch, k = divmod(int(step), self.steps_per_epoch)
    plan = self.epoch_plan(epoch)[k]
    return [plan[p] for p in self._parts]

  def indices_at(self, step: int) -> tuple[np.ndarray, int]:
    """(this process's slots' example indices, -1 = unused slot; the row length L)."""
    return (np.concatenate([lay.example for lay in self.layouts_at(step)]),
            self.geometry.length)

  def batch_at(self, step: int) -> Batch:
    g = self.geometry
    return pack(self.enc, self.layouts_at(step), rows_per=g.rows // self.num_shards,
                length=g.length, part_index=self._parts)

  def padding_fraction(self, epoch: int = 0) -> float:
    layouts = [lay for parts in self.epoch_plan(epoch) for lay in parts]
    return padding_fraction(self.enc, layouts, self.geometry.rows // self.num_shards,
                            self.geometry.length)

  def examples_per_row(self, epoch: int = 0) -> float:
    plan = self.epoch_plan(epoch)
    used = sum(int((lay.example >= 0).sum()) for parts in plan for lay in parts)
    return used / (len(plan) * self.geometry.rows)

  def __iter__(self) -> Iterator[Batch]:
    return self

  def __next__(self) -> Batch:
    batch = self.batch_at(self.step)
    self.step += 1
    return batch

  def state_dict(self) -> dict:
    return {"step": self.step, "seed": self.seed, "fingerprint": self.fingerprint}

  def from_state_dict(self, state: dict) -> "PackedTrainBatcher":
    _check_fingerprint(state, self.fingerprint)
    return PackedTrainBatcher(self.enc, batch_size=self.batch_size, seed=int(state["seed"]),
                              geometry=self.geometry, num_shards=self.num_shards,
                              drop_remainder=self.drop_remainder, fingerprint=self.fingerprint,
                              stream=self.stream, step=int(state["step"]), shards=self.shards)


def eval_plan(enc: Encoded, geometry: Geometry, num_shards: int = 1) -> list[list[Layout]]:
  """Every example once, in file order: each batch takes, shard by shard, as many consecutive
  examples as first-fit decreasing places in R_e / num_shards rows (at most E_e / num_shards)."""
  rows_per = geometry.eval_rows // num_shards
  slots_per = geometry.eval_slots // num_shards
  lengths = enc.lengths.astype(np.int64)
  if len(lengths) and lengths.max() > geometry.length:
    raise ValueError(f"an eval example of {int(lengths.max())} tokens exceeds the packed row "
                     f"length {geometry.length}")
  plan, a, n = [], 0, len(lengths)
  while a < n:
    parts = []
    for _ in range(num_shards):
      lo, hi = 0, min(slots_per, n - a)  # the most consecutive examples that fit: binary search
      while lo < hi:
        mid = (lo + hi + 1) // 2
        if rows_needed(lengths[a:a + mid], geometry.length) <= rows_per:
          lo = mid
        else:
          hi = mid - 1
      members = np.arange(a, a + lo)
      row, off = first_fit_decreasing(lengths[members], rows_per, geometry.length)
      ex = np.full(slots_per, -1, np.int64)
      r = np.zeros(slots_per, np.int64)
      o = np.zeros(slots_per, np.int64)
      ex[:lo], r[:lo], o[:lo] = members, row, off
      parts.append(Layout(ex, r, o))
      a += lo
    plan.append(parts)
  return plan


def eval_batches(enc: Encoded, *, geometry: Geometry, num_shards: int = 1,
                 shards: Sequence[int] | None = None, plan=None) -> Iterator[Batch]:
  """Packed eval batches of `eval_plan` (this process's shards only with `shards`); the real
  slots of all batches, in order, are the split's examples in file order."""
  parts = list(range(num_shards)) if shards is None else [int(k) for k in shards]
  for layouts in (eval_plan(enc, geometry, num_shards) if plan is None else plan):
    yield pack(enc, [layouts[p] for p in parts], rows_per=geometry.eval_rows // num_shards,
               length=geometry.length, part_index=parts)


def unpack_tokens(batch: Batch, values: np.ndarray) -> list[np.ndarray]:
  """Per-token values [R, L, ...] of a packed batch -> one [n_e, ...] array per real slot, in
  slot order (a token head's logits or labels, row by example)."""
  segments = np.asarray(batch["segment_ids"])
  flat = np.asarray(values).reshape((-1,) + np.asarray(values).shape[2:])
  start = np.asarray(batch["example_start"])
  counts = np.bincount(segments.reshape(-1), minlength=len(start) + 1)[1:]
  return [flat[start[e]:start[e] + counts[e]]
          for e in np.flatnonzero(np.asarray(batch["example_mask"]) > 0)]


def slots_as_rows(batch: Batch, prefix: str = "") -> dict:
  """The examples of a packed (sub-)batch as right-padded rows, one per slot: input_ids,
  attention_mask, token_type_ids int32 [E, L] (unused slots all padding)."""
  seg = np.asarray(batch[prefix + "segment_ids"])
  start = np.asarray(batch[prefix + "example_start"])
  num, length = len(start), seg.shape[1]
  counts = np.bincount(seg.reshape(-1), minlength=num + 1)[1:]
  within = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
  slot = np.repeat(np.arange(num), counts)
  src = np.repeat(start.astype(np.int64), counts) + within
  out = {}
  for key in ("input_ids", "token_type_ids"):
    rows = np.zeros((num, length), np.int32)  # beyond attention_mask nothing is read
    rows[slot, within] = np.asarray(batch[prefix + key]).reshape(-1)[src]
    out[key] = rows
  out["attention_mask"] = (np.arange(length)[None] < counts[:, None]).astype(np.int32)
  return out


def rows_into_slots(batch: Batch, rows: dict, prefix: str = "", pad_id: int = 0) -> dict:
  """Right-padded per-slot rows [E, L] (no longer than the slots they replace: an augmented
  view) laid out where `batch`'s slots are: same rows, offsets, slot ids and example_start, so
  slot e of both is the same example. -> the packed arrays (no prefix)."""
  seg = np.asarray(batch[prefix + "segment_ids"])
  start = np.asarray(batch[prefix + "example_start"])
  num, shape = len(start), seg.shape
  old = np.bincount(seg.reshape(-1), minlength=num + 1)[1:]
  new = np.asarray(rows["attention_mask"]).sum(1).astype(np.int64)
  if (new > old).any():
    raise ValueError("a view's example is longer than the packed slot it replaces")
  within = np.arange(int(new.sum())) - np.repeat(np.cumsum(new) - new, new)
  slot = np.repeat(np.arange(num), new)
  dest = np.repeat(start.astype(np.int64), new) + within
  out = {}
  for key, fill in (("input_ids", pad_id), ("token_type_ids", 0)):
    flat = np.full(seg.size, fill, np.int32)
    flat[dest] = np.asarray(rows[key])[slot, within]
    out[key] = flat.reshape(shape)
  segments = np.zeros(seg.size, np.int32)
  segments[dest] = slot + 1
  positions = np.zeros(seg.size, np.int32)
  positions[dest] = within
  out.update(segment_ids=segments.reshape(shape), position_ids=positions.reshape(shape),
             attention_mask=(segments > 0).astype(np.int32).reshape(shape),
             example_start=start.copy(), example_mask=np.asarray(batch[prefix + "example_mask"]))
  return out
