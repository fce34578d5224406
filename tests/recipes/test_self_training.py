"""Self-training (Noisy Student) end to end: a teacher run, its pseudo-labels for the pool, a
student run on labeled + pseudo-labeled rows; tiny random BERT on movie reviews, a few steps."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxft.recipes import self_training
from jaxft.recipes import run as train_and_evaluate
from tests.train.test_loop import make_config


def test_a_round_trains_the_student_on_the_teachers_labels(tiny_bert_dir, tmp_path):
  cfg = make_config(tiny_bert_dir, data__labeled_per_class=8, train__num_steps=4,
                    train__eval_every=4, self_training__rounds=1,
                    self_training__max_per_class=5)
  workdir = tmp_path / "st"
  results = train_and_evaluate(cfg, workdir)
  r0, r1 = results["self_training"]
  assert r0["round"] == 0 and r0["train_examples"] == 16
  probs, truth = self_training.pool_probabilities(workdir / "round-0")
  expected = sum(min(5, n) for n in np.bincount(probs.argmax(-1)))  # 5 per predicted class
  assert r1["round"] == 1 and r1["pseudo_labeled"] == expected
  assert r1["train_examples"] == 16 + expected
  assert 0.0 <= r1["pseudo_label_accuracy"] <= 1.0
  assert results["self_training_last"] == r1  # addressable by path in tables
  assert results["eval"] == json.loads((workdir / "round-1" / "results.json").read_text())["eval"]

  # The file holds the teacher's argmax for its 5 most confident rows of each predicted class.
  saved = json.loads((workdir / "pseudo_labels" / "round-1.json").read_text())
  assert len(probs) == saved["pool_size"] == 48 and len(truth) == 48
  rows = np.asarray(saved["rows"])
  np.testing.assert_array_equal(saved["labels"], probs[rows].argmax(-1))
  for c in np.unique(saved["labels"]):
    chosen = rows[np.asarray(saved["labels"]) == c]
    rest = np.setdiff1d(np.flatnonzero(probs.argmax(-1) == c), chosen)
    assert len(chosen) == min(5, np.sum(probs.argmax(-1) == c))
    assert (not len(rest) or probs[rest, c].max() <= probs[chosen, c].min())
  acc = np.mean(np.asarray(saved["labels"]) == np.asarray(truth)[rows])
  assert r1["pseudo_label_accuracy"] == pytest.approx(acc)
  # Rerunning reuses the finished rounds.
  mtime = (workdir / "round-1" / "results.json").stat().st_mtime
  assert train_and_evaluate(cfg, workdir)["self_training"] == results["self_training"]
  assert (workdir / "round-1" / "results.json").stat().st_mtime == mtime

  # A finished run as the first teacher: the same labels as round 0 of the run above gave.
  cfg.self_training.teacher = str(workdir / "round-0")
  again = train_and_evaluate(cfg, tmp_path / "from_teacher")
  assert not (tmp_path / "from_teacher" / "round-0").exists()
  assert again["self_training"][0]["eval"] == r0["eval"]
  mine = json.loads((tmp_path / "from_teacher" / "pseudo_labels" / "round-1.json").read_text())
  assert (mine["rows"], mine["labels"]) == (saved["rows"], saved["labels"])
  cfg.seed = 1  # another labeled subset, so the teacher's pool rows mean other texts
  with pytest.raises(ValueError, match="another labeled subset"):
    train_and_evaluate(cfg, tmp_path / "other_seed")
  assert not (tmp_path / "other_seed").exists()  # refused before anything is written


def test_self_training_needs_a_pool(tiny_bert_dir, tmp_path):
  with pytest.raises(ValueError, match="labeled_per_class > 0"):
    train_and_evaluate(make_config(tiny_bert_dir, self_training__rounds=1), tmp_path / "a")
  cfg = make_config(tiny_bert_dir, data__labeled_per_class=8, self_training__rounds=1,
                    data__pseudo_labels="x.json")
  with pytest.raises(ValueError, match="leave it"):
    train_and_evaluate(cfg, tmp_path / "b")
  cfg.data.pseudo_labels = ""
  cfg.self_training.teacher = str(tmp_path)
  with pytest.raises(ValueError, match="not a finished jaxft workdir"):
    train_and_evaluate(cfg, tmp_path / "c")
  assert not any((tmp_path / d).exists() for d in "abc")
