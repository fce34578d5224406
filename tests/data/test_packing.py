"""Packed batches: the layout, the order (pure in seed and step, resumable, sharded), eval in file
order, and the padding the quickstart's real data leaves (docs claim <= 5% train, <= 10% eval)."""

import ml_collections
import numpy as np
import pytest
import transformers

from jaxft.data import augment, packing, pipeline
from jaxft.data.tokenize import Encoded


def synthetic(n=203, low=1, high=30, seed=0, token_labels=False) -> Encoded:
  rs = np.random.RandomState(seed)
  lens = rs.randint(low, high, n)
  off = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
  ids = rs.randint(5, 100, off[-1]).astype(np.int32)
  types = rs.randint(0, 2, off[-1]).astype(np.int32)
  if token_labels:
    return Encoded(ids, types, off, np.zeros(n, bool), rs.randint(0, 5, off[-1]).astype(np.int32),
                   0, "token_classification")
  return Encoded(ids, types, off, np.zeros(n, bool), rs.randint(0, 3, n).astype(np.int32), 0,
                 "classification")


def check_layout(enc, batch, slots, geometry, rows_per_shard, num_shards=1):
  """Every real slot holds its example's tokens, ids, positions and label where example_start
  says; padding is segment 0; a shard's slots sit in that shard's rows."""
  seg, length = batch["segment_ids"], geometry.length
  assert batch["input_ids"].shape == seg.shape == batch["position_ids"].shape
  assert (batch["attention_mask"] == (seg > 0)).all()
  per_shard = len(slots) // num_shards
  for e in np.flatnonzero(slots >= 0):
    i = slots[e]
    a, b = enc.offsets[i], enc.offsets[i + 1]
    r, o = divmod(int(batch["example_start"][e]), length)
    n = b - a
    np.testing.assert_array_equal(batch["input_ids"][r, o:o + n], enc.input_ids[a:b])
    np.testing.assert_array_equal(batch["token_type_ids"][r, o:o + n], enc.token_type_ids[a:b])
    np.testing.assert_array_equal(batch["position_ids"][r, o:o + n], np.arange(n))
    assert (seg[r, o:o + n] == e + 1).all() and (seg == e + 1).sum() == n
    assert batch["example_mask"][e] == 1.0 and batch["labels"][e] == enc.labels[i]
    assert r // rows_per_shard == e // per_shard
  assert (batch["example_mask"][slots < 0] == 0).all()
  assert (seg > 0).sum() == enc.lengths[slots[slots >= 0]].sum()


def test_train_order_layout_shards_and_resume():
  enc = synthetic()
  g = packing.choose_geometry(enc.lengths, batch_size=16, max_length=32, steps=len(enc) // 16,
                              num_shards=2, eval_lengths=[enc.lengths], eval_batch_size=24)
  assert g.length == 32 and g.rows % 2 == 0 and g.slots % 2 == 0 and g.slots > 16
  bt = packing.PackedTrainBatcher(enc, batch_size=16, seed=3, geometry=g, num_shards=2)
  assert bt.shapes == [(g.rows, 32)] and bt.steps_per_epoch == 12
  for epoch in (0, 1):
    seen = []
    for s in range(epoch * 12, (epoch + 1) * 12):
      slots, _ = bt.indices_at(s)
      check_layout(enc, bt.batch_at(s), slots, g, g.rows // 2, num_shards=2)
      seen.extend(slots[slots >= 0])
    # every example at most once, all but the N mod B that sit the epoch out (or overflow)
    assert len(seen) == len(set(seen)) == 192 - bt.overflow[epoch]
  assert bt.overflow[0] == 0  # R is chosen so that epoch 0 fits
  # a pure function of (seed, step): a fresh batcher, a resumed one, another process's rows
  again = packing.PackedTrainBatcher(enc, batch_size=16, seed=3, geometry=g, num_shards=2,
                                     fingerprint="f")
  for _ in range(7):
    next(again)
  resumed = again.from_state_dict(again.state_dict())
  for s in (7, 8, 30):
    resumed.step = s
    want = bt.batch_at(s)
    for k, v in next(resumed).items():
      np.testing.assert_array_equal(v, want[k])
  second = packing.PackedTrainBatcher(enc, batch_size=16, seed=3, geometry=g, num_shards=2,
                                      shards=[1]).batch_at(5)
  whole = bt.batch_at(5)
  for k, v in second.items():
    np.testing.assert_array_equal(v, whole[k][len(whole[k]) // 2:])
  other = packing.PackedTrainBatcher(enc, batch_size=16, seed=4, geometry=g, num_shards=2)
  assert not np.array_equal(other.indices_at(0)[0], bt.indices_at(0)[0])
  with pytest.raises(ValueError, match="saved on different data"):
    bt.from_state_dict(again.state_dict())


def test_batches_are_length_stratified():
  """Dealing by length strata gives every batch B examples and nearly the same token count."""
  enc = synthetic(n=640, low=3, high=60, seed=1)
  g = packing.choose_geometry(enc.lengths, batch_size=32, max_length=64, steps=20)
  bt = packing.PackedTrainBatcher(enc, batch_size=32, seed=0, geometry=g)
  tokens = [enc.lengths[bt.indices_at(s)[0][bt.indices_at(s)[0] >= 0]].sum() for s in range(20)]
  assert np.std(tokens) < 0.02 * np.mean(tokens)
  assert all((bt.indices_at(s)[0] >= 0).sum() == 32 for s in range(20))
  assert bt.padding_fraction(0) < 0.08  # lengths up to 59 in rows of 64 leave gaps


def test_eval_in_file_order_and_token_unpacking():
  enc = synthetic(n=150, token_labels=True)
  g = packing.eval_geometry([enc.lengths], eval_batch_size=24, max_length=32, num_shards=2)
  batches = list(packing.eval_batches(enc, geometry=g, num_shards=2))
  assert {b["input_ids"].shape for b in batches} == {(g.eval_rows, g.length)}
  rows = [packing.unpack_tokens(b, b["input_ids"]) for b in batches]
  labels = [packing.unpack_tokens(b, b["labels"]) for b in batches]
  flat = [r for chunk in rows for r in chunk]
  assert len(flat) == 150
  for i, (r, lab) in enumerate(zip(flat, [x for c in labels for x in c])):
    np.testing.assert_array_equal(r, enc.input_ids[enc.row(i)])
    np.testing.assert_array_equal(lab, enc.labels[enc.row(i)])
  assert (np.concatenate([b["labels"] for b in batches])[
      np.concatenate([b["segment_ids"] for b in batches]) == 0] == -100).all()


def test_a_strong_view_keeps_its_weak_slots():
  enc = synthetic(n=64, low=4, high=20)
  g = packing.choose_geometry(enc.lengths, batch_size=16, max_length=24, steps=4)
  bt = packing.PackedTrainBatcher(enc, batch_size=16, seed=0, geometry=g)
  batch = {f"unlabeled/{k}": v for k, v in bt.batch_at(1).items()}
  weak = packing.slots_as_rows(batch, "unlabeled/")
  back = packing.rows_into_slots(batch, weak, "unlabeled/")
  for k, v in back.items():
    np.testing.assert_array_equal(v, batch["unlabeled/" + k])
  slots, _ = bt.indices_at(1)
  aug = augment.augment_token_batch(weak["input_ids"], weak["attention_mask"], "token_strong",
                                    seed=0, epoch=0, indices=np.maximum(slots, 0),
                                    special_ids=[], pad_id=0, replace_id=None,
                                    token_type_ids=weak["token_type_ids"])
  strong = packing.rows_into_slots(batch, aug, "unlabeled/")
  np.testing.assert_array_equal(strong["example_start"], batch["unlabeled/example_start"])
  for e in np.flatnonzero(slots >= 0):
    n = int(aug["attention_mask"][e].sum())
    r, o = divmod(int(strong["example_start"][e]), g.length)
    np.testing.assert_array_equal(strong["input_ids"][r, o:o + n], aug["input_ids"][e, :n])
    assert (strong["segment_ids"] == e + 1).sum() == n <= enc.lengths[slots[e]]


@pytest.fixture(scope="module")
def mr_bundle(minilm_dir, tmp_path_factory):
  """The quickstart's data: MR, max length 64, batch 32, eval batch 128, packed."""
  from jaxft.config import base_config, movie_reviews_cpu
  c = movie_reviews_cpu(base_config())
  c.data.cache_dir = str(tmp_path_factory.mktemp("tok"))
  tok = transformers.AutoTokenizer.from_pretrained(str(minilm_dir))
  return (pipeline.build(c.data, tok, batch_size=32, eval_batch_size=128, seed=0, packing=True),
          c, tok)


def test_quickstart_padding_on_real_data(mr_bundle):
  b, c, tok = mr_bundle
  st = b.stats
  # the numbers docs/design.md and benchmarks/README.md quote for the quickstart
  assert st["train/padding_fraction"] <= 0.05 and st["validation/padding_fraction"] <= 0.10
  assert st["train/packing_overflow"] == 0 and st["train/steps_per_epoch"] == 298
  assert st["train/examples_per_row"] > 2
  assert b.train.shapes == [(b.geometry.rows, 64)]
  bucketed = pipeline.build(c.data, tok, batch_size=32, eval_batch_size=128, seed=0,
                            packing=False)
  assert bucketed.stats["train/padding_fraction"] > 0.3  # what packing removes
  assert bucketed.train.fingerprint != b.train.fingerprint
  labels = np.concatenate([x["labels"][x["example_mask"] > 0] for x in b.eval["validation"]()])
  np.testing.assert_array_equal(labels, b.examples["validation"].labels)
