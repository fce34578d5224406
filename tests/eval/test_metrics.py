"""Metrics against sklearn / scipy / seqeval, hand computations, and a conlleval port."""

import math

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from jaxft.data.tasks import TaskInfo
from jaxft.eval import metrics

BIN = TaskInfo("t", "classification", ("neg", "pos"), 2, ("accuracy", "f1"), "accuracy")
MULTI = TaskInfo("t", "classification", ("a", "b", "c", "d"), 4, ("accuracy",), "accuracy")
REG = TaskInfo("t", "regression", (), 1, ("pearson", "spearman"), "pearson")
NER = TaskInfo("t", "token_classification", ("O", "B-PER", "I-PER", "B-LOC", "I-LOC"), 5,
               ("entity_f1",), "entity_f1")


def test_binary_hand_example():
  gold = [1, 1, 1, 0, 0, 0, 0, 1]
  pred = [1, 1, 0, 0, 0, 1, 0, 1]
  # TP=3, FN=1, FP=1, TN=3: acc 6/8; F1 = 2*3/(2*3+1+1) = 0.75; MCC = (9-1)/sqrt(4*4*4*4) = 0.5
  m = metrics.compute(BIN, np.array(pred), np.array(gold))
  assert m["accuracy"] == 0.75
  assert m["f1"] == pytest.approx(0.75)
  assert m["mcc"] == pytest.approx(0.5)
  # f1_macro: class 0 has TP=3, FP=1, FN=1 -> 0.75 too
  assert m["f1_macro"] == pytest.approx(0.75)


def test_classification_matches_sklearn():
  rng = np.random.default_rng(0)
  gold = rng.integers(0, 4, 500)
  pred = np.where(rng.random(500) < 0.6, gold, rng.integers(0, 4, 500))
  m = metrics.compute(MULTI, pred, gold)
  assert m["accuracy"] == pytest.approx(skm.accuracy_score(gold, pred))
  assert m["f1"] == pytest.approx(skm.f1_score(gold, pred, average="macro"))
  assert m["f1_macro"] == m["f1"]
  assert m["mcc"] == pytest.approx(skm.matthews_corrcoef(gold, pred))
  gold2, pred2 = gold % 2, pred % 2
  m2 = metrics.compute(BIN, pred2, gold2)
  assert m2["f1"] == pytest.approx(skm.f1_score(gold2, pred2))
  assert m2["mcc"] == pytest.approx(skm.matthews_corrcoef(gold2, pred2))


def test_mask_drops_padding_rows():
  gold = np.array([1, 0, 1, 0])
  pred = np.array([1, 0, 0, 1])
  m = metrics.compute(BIN, pred, gold, mask=np.array([1.0, 1.0, 0.0, 0.0]))
  assert m["accuracy"] == 1.0


def test_regression_matches_scipy():
  rng = np.random.default_rng(1)
  gold = rng.uniform(0, 5, 300)
  pred = gold + rng.normal(0, 1, 300)
  m = metrics.compute(REG, pred.astype(np.float32), gold)
  assert m["pearson"] == pytest.approx(stats.pearsonr(pred.astype(np.float32), gold)[0], rel=1e-6)
  assert m["spearman"] == pytest.approx(stats.spearmanr(pred.astype(np.float32), gold)[0],
                                        rel=1e-6)
  # hand: perfectly monotone but non-linear -> spearman 1, pearson < 1
  m = metrics.compute(REG, np.array([1.0, 2.0, 3.0, 10.0]), np.array([1.0, 2.0, 3.0, 4.0]))
  assert m["spearman"] == pytest.approx(1.0)
  assert m["pearson"] < 0.95
  assert m["mse"] == pytest.approx(36 / 4)
  assert math.isnan(metrics.compute(REG, np.ones(4), np.arange(4.0))["pearson"])


def test_predictions_from_logits():
  logits = np.array([[0.1, 2.0], [3.0, -1.0]])
  np.testing.assert_array_equal(metrics.predictions_from_logits("classification", logits), [1, 0])
  np.testing.assert_allclose(metrics.predictions_from_logits("regression", [[0.5], [2.5]]),
                             [0.5, 2.5])
  tok = np.zeros((1, 3, 5))
  tok[0, :, 2] = 1
  np.testing.assert_array_equal(metrics.predictions_from_logits("token_classification", tok),
                                [[2, 2, 2]])
  with pytest.raises(ValueError, match="unknown task kind"):
    metrics.predictions_from_logits("ranking", logits)


def test_entities_ignore_minus_100_positions():
  # [CLS] w0 w1(first) w1(second) w2 [SEP] pad: -100 marks everything but first sub-tokens.
  labels = np.array([[-100, 1, 2, -100, 0, -100, -100]])
  preds = np.array([[0, 1, 2, 4, 0, 3, 3]])  # junk at ignored positions must not count
  m = metrics.compute(NER, preds, labels)
  assert m["entity_f1"] == 1.0 and m["token_accuracy"] == 1.0
  preds2 = np.array([[0, 1, 0, 2, 0, 3, 3]])  # w1 predicted O: PER span shrinks to w0 only
  m2 = metrics.compute(NER, preds2, labels)
  assert m2["entity_precision"] == 0.0 and m2["entity_recall"] == 0.0
  assert m2["token_accuracy"] == pytest.approx(2 / 3)
  # ragged lists work the same as a padded array
  m3 = metrics.compute(NER, [preds[0, :5]], [labels[0, :5]])
  assert m3 == m


def test_iob1_hand_example():
  """IOB1 (CoNLL-2003 as released): B- only splits adjacent same-type entities."""
  gold = ["I-PER", "I-PER", "B-PER", "O", "I-LOC", "O", "I-ORG", "I-ORG"]
  pred = ["I-PER", "I-PER", "B-PER", "O", "I-LOC", "I-LOC", "O", "I-ORG"]
  # by hand (conlleval rules): gold chunks PER[0-1] PER[2] LOC[4] ORG[6-7]; predicted PER[0-1]
  # PER[2] LOC[4-5] ORG[7]; correct: the two PER chunks -> P = R = F1 = 2/4.
  m = metrics.entity_scores([pred], [gold])
  assert m == {"entity_precision": 0.5, "entity_recall": 0.5, "entity_f1": 0.5}
  assert _conlleval_chunks(gold) == {("PER", 0, 1), ("PER", 2, 2), ("LOC", 4, 4), ("ORG", 6, 7)}


def _conlleval_chunks(tags):
  """Chunks by conlleval.pl's startOfChunk / endOfChunk (B/I/O part), as (type, start, end)."""
  chunks, start = set(), None
  prev_tag, prev_type = "O", ""
  for i, t in enumerate(list(tags) + ["O"]):
    tag, _, typ = t.partition("-")
    end = (prev_tag in "BI" and tag in "BO") or (prev_tag == "I" and tag == "B") or \
        (prev_tag != "O" and prev_type != typ)
    begin = (tag == "B") or (prev_tag == "O" and tag == "I") or (tag != "O" and prev_type != typ)
    if end and start is not None:
      chunks.add((prev_type, start, i - 1))
      start = None
    if begin:
      start = i
    prev_tag, prev_type = tag, typ
  return chunks


def _conlleval_scores(preds, golds):
  correct = n_pred = n_gold = 0
  for p, g in zip(preds, golds):
    cp, cg = _conlleval_chunks(p), _conlleval_chunks(g)
    correct += len(cp & cg)
    n_pred += len(cp)
    n_gold += len(cg)
  prec, rec = correct / n_pred, correct / n_gold
  return prec, rec, 2 * prec * rec / (prec + rec)


def test_seqeval_matches_conlleval_on_real_conll(shared_data):
  """Real eng.testa IOB1 gold vs a seeded corruption: seqeval's default mode == conlleval."""
  from jaxft.data import readers
  sents = readers.read_conll(shared_data / "conll2003" / "eng.testa")[:600]
  golds = [t for _, t in sents]
  tagset = ["O", "I-PER", "I-LOC", "I-ORG", "I-MISC", "B-LOC", "B-MISC", "B-ORG", "B-PER"]
  rng = np.random.default_rng(0)
  preds = [[tagset[rng.integers(len(tagset))] if rng.random() < 0.15 else t for t in g]
           for g in golds]
  m = metrics.entity_scores(preds, golds)
  p, r, f = _conlleval_scores(preds, golds)
  assert 0.3 < f < 0.95  # the corruption is substantial but not total
  assert m["entity_precision"] == pytest.approx(p, abs=1e-12)
  assert m["entity_recall"] == pytest.approx(r, abs=1e-12)
  assert m["entity_f1"] == pytest.approx(f, abs=1e-12)
