"""Bucketed batches on real tokenized rows: shapes, coverage, determinism, resume, eval order."""

import numpy as np
import pytest
import transformers

from jaxft.data import batching, readers, tokenize
from jaxft.data.tasks import IGNORE, Examples


@pytest.fixture(scope="module")
def tok(minilm_dir):
  return transformers.AutoTokenizer.from_pretrained(str(minilm_dir))


@pytest.fixture(scope="module")
def sst2(shared_data, tok):
  _, rows = readers.read_delimited(shared_data / "glue" / "SST-2" / "dev.tsv", delimiter="\t",
                                   header=True, quoting=False)
  rows = rows[:203]
  ex = Examples(texts=([r[0] for r in rows],), labels=[int(r[1]) for r in rows])
  return tokenize.encode(ex, tok, kind="classification", max_length=64)


@pytest.fixture(scope="module")
def conll(shared_data, tok):
  sents = readers.read_conll(shared_data / "conll2003" / "eng.testa")[:90]
  ex = Examples(words=[w for w, _ in sents], labels=[[int(t != "O") for t in tags]
                                                     for _, tags in sents])
  return tokenize.encode(ex, tok, kind="token_classification", max_length=64)


def test_parse_boundaries():
  assert batching.parse_boundaries("", 128) == (8, 16, 32, 64, 128)
  assert batching.parse_boundaries("", 100) == (8, 16, 32, 64, 100)
  assert batching.parse_boundaries("32,64", 128) == (32, 64, 128)
  assert batching.parse_boundaries("16, 128", 128) == (16, 128)
  with pytest.raises(ValueError, match="exceeds data.max_length=128"):
    batching.parse_boundaries("64,256", 128)
  with pytest.raises(ValueError, match="strictly increasing"):
    batching.parse_boundaries("64,32", 128)
  with pytest.raises(ValueError, match="comma-separated integers"):
    batching.parse_boundaries("32;64", 128)


def make(enc, **kw):
  args = dict(batch_size=16, seed=3, boundaries=(8, 16, 32, 64), fingerprint="fp")
  args.update(kw)
  return batching.TrainBatcher(enc, **args)


def test_epoch_covers_data_and_shapes_are_bounded(sst2):
  b = make(sst2, drop_remainder=False)
  assert b.steps_per_epoch == 13  # ceil(203 / 16)
  shapes, seen = set(), []
  for s in range(b.steps_per_epoch):
    batch = b.batch_at(s)
    rows, seq_len = b.indices_at(s)
    shapes.add(batch["input_ids"].shape)
    real = rows[rows >= 0]
    seen.extend(real.tolist())
    # the bucket is the smallest boundary that holds the longest row
    longest = sst2.lengths[real].max()
    assert seq_len == min(x for x in b.boundaries if x >= longest)
    np.testing.assert_array_equal(batch["example_mask"], (rows >= 0).astype(np.float32))
    np.testing.assert_array_equal(batch["attention_mask"].sum(1)[rows >= 0], sst2.lengths[real])
    np.testing.assert_array_equal(batch["labels"][rows >= 0], sst2.labels[real])
    assert {k: v.dtype for k, v in batch.items()} == {
        "input_ids": np.int32, "attention_mask": np.int32, "token_type_ids": np.int32,
        "labels": np.int32, "example_mask": np.float32}
  assert sorted(seen) == list(range(203))  # every example exactly once per epoch
  assert shapes <= set(b.shapes) and len(b.shapes) == 4
  drop = make(sst2)
  assert drop.steps_per_epoch == 12
  rows = np.concatenate([drop.indices_at(s)[0] for s in range(12)])
  assert len(set(rows.tolist())) == 192 and (rows >= 0).all()


def test_pad_rows_and_content(sst2):
  b = make(sst2, drop_remainder=False)
  last = next(s for s in range(13) if (b.indices_at(s)[0] < 0).any())
  rows, _ = b.indices_at(last)
  batch = b.batch_at(last)
  assert (rows < 0).sum() == 16 * 13 - 203
  pad = rows < 0
  assert (batch["input_ids"][pad] == 0).all() and (batch["attention_mask"][pad] == 0).all()
  r = int(np.flatnonzero(~pad)[0])
  n = sst2.lengths[rows[r]]
  np.testing.assert_array_equal(batch["input_ids"][r, :n], sst2.input_ids[sst2.row(rows[r])])
  assert (batch["input_ids"][r, n:] == sst2.pad_id).all()


def test_batch_is_a_pure_function_of_seed_and_step(sst2):
  a, b = make(sst2), make(sst2)
  for s in (0, 5, 11, 12, 30, 7):  # across epochs and out of order
    for k, v in a.batch_at(s).items():
      np.testing.assert_array_equal(v, b.batch_at(s)[k])
  # a new epoch is a new order; another seed another order
  assert not np.array_equal(a.indices_at(0)[0], a.indices_at(12)[0])
  assert not np.array_equal(a.indices_at(0)[0], make(sst2, seed=4).indices_at(0)[0])


def test_resume_from_state_dict(sst2):
  run = make(sst2)
  for _ in range(17):
    next(run)
  state = run.state_dict()
  assert state == {"step": 17, "seed": 3, "fingerprint": "fp"}
  expected = [next(run) for _ in range(10)]
  resumed = make(sst2, seed=99).from_state_dict(state)  # seed comes from the checkpoint
  for want in expected:
    got = next(resumed)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  with pytest.raises(ValueError, match="saved on different data"):
    make(sst2, fingerprint="other").from_state_dict(state)


def test_token_batches(conll):
  b = make(conll, batch_size=8, drop_remainder=False)
  batch = b.batch_at(2)
  rows, seq_len = b.indices_at(2)
  assert batch["labels"].shape == (8, seq_len) and batch["labels"].dtype == np.int32
  for r, i in enumerate(rows):
    if i < 0:
      assert (batch["labels"][r] == IGNORE).all()
      continue
    n = conll.lengths[i]
    np.testing.assert_array_equal(batch["labels"][r, :n], conll.labels[conll.row(i)])
    assert (batch["labels"][r, n:] == IGNORE).all()


def test_eval_batches_in_order_once(sst2):
  batches = list(batching.eval_batches(sst2, batch_size=32, boundaries=(8, 16, 32, 64)))
  assert len(batches) == 7
  mask = np.concatenate([b["example_mask"] for b in batches])
  assert mask.sum() == 203 and (mask[:203] == 1).all() and (mask[203:] == 0).all()
  labels = np.concatenate([b["labels"] for b in batches])[:203]
  np.testing.assert_array_equal(labels, sst2.labels)
  i = 0
  for b in batches:
    for r in range(32):
      if b["example_mask"][r]:
        n = sst2.lengths[i]
        np.testing.assert_array_equal(b["input_ids"][r, :n], sst2.input_ids[sst2.row(i)])
        i += 1
  assert {b["input_ids"].shape[1] for b in batches} <= {8, 16, 32, 64}


def test_num_shards_must_divide_batch(sst2):
  with pytest.raises(ValueError, match="batch_size=12 is not divisible by the 8 devices"):
    make(sst2, batch_size=12, num_shards=8)
  with pytest.raises(ValueError, match="eval_batch_size=10 is not divisible by the 4 devices"):
    next(batching.eval_batches(sst2, batch_size=10, boundaries=(64,), num_shards=4))
  with pytest.raises(ValueError, match="make no full batch of 256"):
    make(sst2, batch_size=256)


def test_merged_unlabeled_batches(sst2):
  unl = tokenize.Encoded(sst2.input_ids, sst2.token_type_ids, sst2.offsets, sst2.truncated, None,
                         sst2.pad_id, "classification")
  m = batching.MergedBatcher(make(sst2), make(unl, batch_size=48, stream=1, fingerprint="u"))
  batch = m.batch_at(4)
  s = batch["input_ids"].shape[1]
  assert batch["unlabeled/input_ids"].shape == (48, s)
  assert batch["unlabeled/example_mask"].shape == (48,) and "unlabeled/labels" not in batch
  assert s == max(m.labeled.indices_at(4)[1], m.unlabeled.indices_at(4)[1])
  assert s in (8, 16, 32, 64)  # shapes stay within the boundaries
  first = [next(m) for _ in range(3)]
  again = m.from_state_dict({"step": 0, "seed": 3, "fingerprint": m.fingerprint})
  for want in first:
    got = next(again)
    assert got.keys() == want.keys()
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


def test_prefetcher(sst2):
  b = make(sst2)
  direct = [b.batch_at(s) for s in range(6)]
  with batching.Prefetcher((make(sst2).batch_at(s) for s in range(6)), size=2) as pf:
    got = list(pf)
  assert len(got) == 6
  for g, d in zip(got, direct):
    np.testing.assert_array_equal(g["input_ids"], d["input_ids"])

  def broken():
    yield direct[0]
    raise RuntimeError("reader failed")

  pf = batching.Prefetcher(broken())
  next(pf)
  with pytest.raises(RuntimeError, match="reader failed"):
    next(pf)
  pf.close()
