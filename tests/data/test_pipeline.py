"""pipeline.build end to end on real subsets with the real MiniLM tokenizer."""

import collections

import ml_collections
import numpy as np
import pytest
import transformers
from seqeval.metrics import f1_score

from jaxft.data import pipeline, readers
from jaxft.data.readers import DataError
from jaxft.eval import metrics


@pytest.fixture(scope="module")
def tok(minilm_dir):
  return transformers.AutoTokenizer.from_pretrained(str(minilm_dir))


def data_config(tmp_path, **kw):
  d = dict(name="", data_dir="", train_file="", validation_file="", test_file="",
           text_columns="", label_column="label", task_kind="", num_labels=0, max_length=32,
           train_split="train", eval_split="validation", max_train_examples=0,
           max_eval_examples=0, bucket_boundaries="", labeled_per_class=0,
           cache_dir=str(tmp_path / "tok"))
  d.update(kw)
  return ml_collections.ConfigDict(d)


def test_cola_subset(shared_data, tmp_path, tok):
  cfg = data_config(tmp_path, name="cola", data_dir=str(shared_data / "glue"),
                    max_train_examples=200, max_eval_examples=100)
  b = pipeline.build(cfg, tok, batch_size=16, eval_batch_size=32, seed=0, num_shards=2)
  assert b.info.name == "cola" and b.info.main_metric == "mcc" and b.info.num_labels == 2
  assert b.boundaries == (8, 16, 32)
  assert b.train.steps_per_epoch == 12 and b.stats["train/steps_per_epoch"] == 12
  assert b.train.num_examples == 200
  assert b.stats["train/n_examples"] == 200 and b.stats["validation/n_examples"] == 100
  assert 0 < b.stats["train/padding_fraction"] < 0.6
  assert b.stats["train/mean_length"] == pytest.approx(b.encoded["train"].lengths.mean())
  shapes = {b.train.batch_at(s)["input_ids"].shape for s in range(24)}
  assert shapes <= {(16, 8), (16, 16), (16, 32)}
  # eval: every example once, in file order; gold labels as predictions score perfectly
  _, rows = readers.read_delimited(shared_data / "glue" / "CoLA" / "dev.tsv", delimiter="\t",
                                   header=False, quoting=False)
  labels, masks = [], []
  for batch in b.eval["validation"]():
    labels.append(batch["labels"])
    masks.append(batch["example_mask"])
  labels, masks = np.concatenate(labels), np.concatenate(masks)
  assert masks.sum() == 100 and len(labels) == 128
  np.testing.assert_array_equal(labels[:100], [int(r[1]) for r in rows[:100]])
  m = metrics.compute(b.info, labels, labels, mask=masks)
  assert m["mcc"] == 1.0 and m["accuracy"] == 1.0
  assert len(list(tmp_path.joinpath("tok").glob("*.npz"))) == 2  # train and validation cached


def test_two_builds_agree_and_resume(shared_data, tmp_path, tok):
  kw = dict(name="rte", data_dir=str(shared_data / "glue"), max_train_examples=120,
            max_eval_examples=8, max_length=64, bucket_boundaries="32,64")
  a = pipeline.build(data_config(tmp_path, **kw), tok, batch_size=8, eval_batch_size=8, seed=5)
  b = pipeline.build(data_config(tmp_path, **kw), tok, batch_size=8, eval_batch_size=8, seed=5)
  assert a.boundaries == (32, 64)
  for s in (0, 14, 15, 40):
    for k, v in a.train.batch_at(s).items():
      np.testing.assert_array_equal(v, b.train.batch_at(s)[k])
  for _ in range(9):
    next(a.train)
  resumed = b.train.from_state_dict(a.train.state_dict())
  for _ in range(3):
    np.testing.assert_array_equal(next(a.train)["input_ids"], next(resumed)["input_ids"])
  other = pipeline.build(data_config(tmp_path, **{**kw, "max_train_examples": 119}), tok,
                         batch_size=8, eval_batch_size=8, seed=5)
  with pytest.raises(ValueError, match="saved on different data"):
    other.train.from_state_dict(a.train.state_dict())


def test_conll_word_level_scoring(shared_data, tmp_path, tok):
  cfg = data_config(tmp_path, name="conll2003", data_dir=str(shared_data / "conll2003"),
                    max_train_examples=64, max_eval_examples=120, max_length=16)
  b = pipeline.build(cfg, tok, batch_size=8, eval_batch_size=16, seed=0)
  assert b.info.kind == "token_classification" and b.info.main_metric == "entity_f1"
  assert b.stats["validation/n_truncated"] > 0
  align = b.ner["validation"]
  # a perfect tagger on the tokens that survived truncation: read its predictions off the labels
  token_preds, token_labels = [], []
  for batch in b.eval["validation"]():
    lab = batch["labels"]
    for r in np.flatnonzero(batch["example_mask"]):
      token_labels.append(lab[r])
      token_preds.append(np.where(lab[r] < 0, 0, lab[r]))
  assert len(token_preds) == 120
  assert metrics.compute(b.info, token_preds, token_labels)["entity_f1"] == 1.0
  words = align.word_predictions(token_preds)
  gold = [np.asarray(g) for g in b.examples["validation"].labels]
  m = metrics.compute(b.info, words, gold)
  # words cut by truncation are predicted O: the same as tagging the truncated tails O by hand
  names = b.info.label_names
  expected_pred = []
  for i, g in enumerate(gold):
    kept = align.first_token[i] >= 0
    expected_pred.append([names[t] if k else "O" for t, k in zip(g, kept)])
  gold_tags = [[names[t] for t in g] for g in gold]
  assert m["entity_f1"] == pytest.approx(f1_score(gold_tags, expected_pred))
  assert m["entity_recall"] < 1.0 and align.n_words_without_token > 0
  assert b.stats["validation/n_words_without_token"] == align.n_words_without_token


def test_semi_supervised_pool(shared_data, tmp_path, tok):
  cfg = data_config(tmp_path, name="cola", data_dir=str(shared_data / "glue"),
                    max_train_examples=300, labeled_per_class=4, max_eval_examples=16)
  b = pipeline.build(cfg, tok, batch_size=8, eval_batch_size=8, seed=1, unlabeled_ratio=3)
  train = b.examples["train"]
  assert collections.Counter(train.labels) == {0: 4, 1: 4}
  assert len(b.unlabeled) == 292 and b.unlabeled.labels is None
  assert not set(train.texts[0]) & set(b.unlabeled.texts[0])
  batch = b.train.batch_at(0)
  s = batch["input_ids"].shape[1]
  assert batch["unlabeled/input_ids"].shape == (24, s)
  assert batch["unlabeled/attention_mask"].shape == (24, s)
  assert b.stats["unlabeled/n_examples"] == 292
  assert any("4 per class" in n for n in b.notes)
  assert "unlabeled/labels" not in batch
  cfg.unlabeled_label_metrics = True  # the pool's true labels ride along, for diagnostics only
  diag = pipeline.build(cfg, tok, batch_size=8, eval_batch_size=8, seed=1, unlabeled_ratio=3)
  got = diag.train.batch_at(0)
  np.testing.assert_array_equal(got["unlabeled/input_ids"], batch["unlabeled/input_ids"])
  rows, _ = diag.train.unlabeled.indices_at(0)
  np.testing.assert_array_equal(got["unlabeled/labels"], np.asarray(b.unlabeled_labels)[rows])
  cfg.unlabeled_label_metrics = False
  again = pipeline.build(cfg, tok, batch_size=8, eval_batch_size=8, seed=1, unlabeled_ratio=3)
  assert again.examples["train"].texts == train.texts  # the labeled subset is seeded
  other = pipeline.build(cfg, tok, batch_size=8, eval_batch_size=8, seed=2, unlabeled_ratio=3)
  assert other.examples["train"].texts != train.texts
  with pytest.raises(DataError, match="needs an unlabeled pool"):
    pipeline.build(data_config(tmp_path, name="cola", data_dir=str(shared_data / "glue"),
                               max_train_examples=50), tok, batch_size=8, eval_batch_size=8,
                   seed=0, unlabeled_ratio=2)


def test_carved_split_note_and_max_length_check(shared_data, tmp_path, tok):
  cfg = data_config(tmp_path, name="ag_news", data_dir=str(shared_data / "ag_news"),
                    max_train_examples=32, max_eval_examples=16)
  b = pipeline.build(cfg, tok, batch_size=8, eval_batch_size=8, seed=0)
  assert any("seeded 80/20 split" in n for n in b.notes)
  assert b.info.label_names == ("World", "Sports", "Business", "Sci/Tech")
  with pytest.raises(DataError, match="exceeds the tokenizer's model_max_length 512"):
    pipeline.build(data_config(tmp_path, name="ag_news", data_dir=str(shared_data / "ag_news"),
                               max_length=1024), tok, batch_size=8, eval_batch_size=8, seed=0)


def test_pseudo_labels_join_the_labeled_rows_of_their_own_pool(shared_data, tmp_path, tok):
  from jaxft.data import pseudo_labels
  cfg = data_config(tmp_path, name="cola", data_dir=str(shared_data / "glue"),
                    max_train_examples=100, labeled_per_class=4, max_eval_examples=16)
  b = pipeline.build(cfg, tok, batch_size=8, eval_batch_size=8, seed=1)
  assert len(b.unlabeled_labels) == len(b.unlabeled) == 92  # true labels kept for diagnostics
  path = pseudo_labels.save(tmp_path / "pl.json", b.unlabeled, [5, 0, 17], [1, 0, 0], round=1)
  cfg.pseudo_labels = str(path)
  got = pipeline.build(cfg, tok, batch_size=8, eval_batch_size=8, seed=1)
  train = got.examples["train"]
  assert len(train) == 11 and got.train.num_examples == 11
  assert train.texts[0][:8] == b.examples["train"].texts[0]
  assert train.texts[0][8:] == [b.unlabeled.texts[0][i] for i in (5, 0, 17)]
  assert train.labels[8:] == [1, 0, 0]
  assert got.unlabeled.texts == b.unlabeled.texts  # the pool itself is unchanged
  with pytest.raises(DataError, match="another unlabeled pool"):  # seed 2 draws another pool
    pipeline.build(cfg, tok, batch_size=8, eval_batch_size=8, seed=2)
  for rows, labels, match in (([92], [0], "outside the pool"), ([3], [2], "out of range"),
                              ([3, 3], [0, 1], "labeled twice")):
    cfg.pseudo_labels = str(pseudo_labels.save(tmp_path / "bad.json", b.unlabeled, rows, labels))
    with pytest.raises(DataError, match=match):
      pipeline.build(cfg, tok, batch_size=8, eval_batch_size=8, seed=1)
  cfg.pseudo_labels = str(tmp_path / "missing.json")
  with pytest.raises(DataError, match="no such file"):
    pipeline.build(cfg, tok, batch_size=8, eval_batch_size=8, seed=1)
  cfg.labeled_per_class = 0
  with pytest.raises(DataError, match="labeled_per_class > 0"):
    pipeline.build(cfg, tok, batch_size=8, eval_batch_size=8, seed=1)
