"""Extra views added to every train batch, still as pure functions of the step.

Each wrapper keeps the batcher contract the loop relies on (steps_per_epoch, shapes, fingerprint,
batch_at(step), state_dict / from_state_dict), so resume stays exact:

  StrongView        "unlabeled/strong/<key>": a strongly augmented copy of the unlabeled rows
                    (FixMatch, UDA), seeded by (seed, example index, epoch).
  WithTeacherLogits "teacher_logits": a distillation teacher's logits, computed once per train
                    example before training and looked up by row.
"""

from __future__ import annotations

import numpy as np

from jaxft.data import augment, packing


class _Wrapper:

  def __init__(self, inner):
    self.inner = inner
    self.steps_per_epoch = inner.steps_per_epoch
    self.num_examples = inner.num_examples
    self.fingerprint = inner.fingerprint

  @property
  def shapes(self):
    return self.inner.shapes

  @property
  def step(self) -> int:
    return self.inner.step

  def state_dict(self) -> dict:
    return self.inner.state_dict()

  def _rewrap(self, inner):
    raise NotImplementedError

  def from_state_dict(self, state: dict):
    return self._rewrap(self.inner.from_state_dict(state))


class StrongView(_Wrapper):
  """Adds a token-level strong view of the "unlabeled/" rows of a MergedBatcher."""

  def __init__(self, inner, policy: str, *, seed: int, special_ids, pad_id: int,
               replace_id: int | None = None):
    super().__init__(inner)
    self.policy, self.seed = policy, int(seed)
    self.special_ids, self.pad_id, self.replace_id = tuple(special_ids), int(pad_id), replace_id
    augment._policy(policy, augment.TOKEN_POLICIES, "token")  # unknown policy: fail now

  def _rewrap(self, inner):
    return StrongView(inner, self.policy, seed=self.seed, special_ids=self.special_ids,
                      pad_id=self.pad_id, replace_id=self.replace_id)

  def batch_at(self, step: int):
    batch = self.inner.batch_at(step)
    unlabeled = self.inner.unlabeled
    rows, _ = unlabeled.indices_at(step)
    epoch = step // unlabeled.steps_per_epoch
    view = dict(seed=self.seed, epoch=epoch, indices=np.maximum(rows, 0),
                special_ids=self.special_ids, pad_id=self.pad_id, replace_id=self.replace_id)
    if "unlabeled/segment_ids" not in batch:
      return augment.add_strong_view(batch, self.policy, **view)
    # Packed: augment every slot's example as a row, then lay the (shorter) views out in the
    # weak view's slots, so slot e of both views is the same example.
    weak = packing.slots_as_rows(batch, "unlabeled/")
    aug = augment.augment_token_batch(weak["input_ids"], weak["attention_mask"], self.policy,
                                      token_type_ids=weak["token_type_ids"], **view)
    strong = packing.rows_into_slots(batch, aug, "unlabeled/", self.pad_id)
    strong.pop("example_mask")
    return {**batch, **{f"unlabeled/strong/{k}": v for k, v in strong.items()}}


class WithTeacherLogits(_Wrapper):
  """Adds "teacher_logits" [B, ...] float32 from a per-example table (zeros for padding rows)."""

  def __init__(self, inner, logits: np.ndarray):
    super().__init__(inner)
    if len(logits) != inner.num_examples:
      raise ValueError(f"{len(logits)} cached teacher logits for {inner.num_examples} train "
                       "examples")
    self.logits = np.asarray(logits, np.float32)

  def _rewrap(self, inner):
    return WithTeacherLogits(inner, self.logits)

  def batch_at(self, step: int):
    batch = self.inner.batch_at(step)
    labeled = getattr(self.inner, "labeled", self.inner)  # a MergedBatcher's labeled part
    rows, _ = labeled.indices_at(step)
    rows = np.asarray(rows)
    out = self.logits[np.maximum(rows, 0)]
    out[rows < 0] = 0.0
    return {**batch, "teacher_logits": out}
