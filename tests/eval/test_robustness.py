"""Robustness evaluation: PGD accuracy against the exact worst case of a linear model, and the
greedy synonym attack with the real WordNet database on a linear bag-of-words classifier."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft.eval import robustness as R
from jaxft.models.outputs import ModelOutput


def linear_apply(params, batch, *, rng=None, deterministic=True, embedding_perturbation=None,
                 output_hidden_states=False, output_attentions=False):
  """logits = W^T mean_s(e_s + delta_s) + b over real tokens: its worst case is known in closed form."""
  emb = params["backbone"]["word"][batch["input_ids"]]
  x = emb if embedding_perturbation is None else emb + embedding_perturbation
  m = batch["attention_mask"].astype(jnp.float32)[:, :, None]
  pooled = jnp.sum(x * m, 1) / jnp.sum(m, 1)
  return ModelOutput(last_hidden_state=x, embeddings=emb,
                     logits=pooled @ params["head"]["kernel"] + params["head"]["bias"])


def make_problem():
  k = jax.random.split(jax.random.key(0), 4)
  params = {"backbone": {"word": jax.random.normal(k[0], (30, 4))},
            "head": {"kernel": jax.random.normal(k[1], (4, 2)), "bias": jnp.zeros(2)}}
  batches = []
  for i, (b, pad_rows) in enumerate(((16, 0), (16, 3))):
    kk = jax.random.split(k[2 + i], 2)
    lengths = 2 + np.arange(b) % 5
    mask = (np.arange(6)[None] < lengths[:, None]).astype(np.int32)
    ex = (np.arange(b) < b - pad_rows).astype(np.float32)
    batches.append({"input_ids": np.asarray(jax.random.randint(kk[0], (b, 6), 0, 30), np.int32),
                    "attention_mask": mask, "example_mask": ex,
                    "labels": np.asarray(jax.random.randint(kk[1], (b,), 0, 2), np.int32)})
  return params, batches


def worst_case_accuracy(params, batches, eps, norm):
  """Binary linear model: the best attack moves the margin (w_y - w_o) . mean(e) by
  eps ||u||_2 / sqrt(n) (L2 over n real tokens) or eps ||u||_1 (L-inf), u = w_y - w_o."""
  E = np.asarray(params["backbone"]["word"], np.float64)
  W = np.asarray(params["head"]["kernel"], np.float64)
  hits, total, margins = 0, 0, []
  for b in batches:
    for ids, m, y, ex in zip(b["input_ids"], b["attention_mask"], b["labels"], b["example_mask"]):
      if ex == 0:
        continue
      n = m.sum()
      u = W[:, y] - W[:, 1 - y]
      margin = E[ids[m == 1]].mean(0) @ u
      shift = eps * (np.linalg.norm(u) / math.sqrt(n) if norm == "l2" else np.abs(u).sum())
      margins.append(margin - shift)
      hits += margin - shift > 0
      total += 1
  return hits / total, np.array(margins)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_pgd_accuracy_equals_the_exact_worst_case_of_a_linear_model(norm):
  params, batches = make_problem()
  epsilons = [0.0, 0.1, 0.4, 1.5] if norm == "l2" else [0.0, 0.02, 0.1, 0.3]
  out = R.pgd_robustness(linear_apply, params, batches, "classification", epsilons, steps=5,
                         norm=norm)
  clean, _ = worst_case_accuracy(params, batches, 0.0, norm)
  assert out["clean_accuracy"] == pytest.approx(clean, abs=1e-12)
  assert out[f"pgd_{norm}/0/accuracy"] == out["clean_accuracy"]
  accs = []
  for eps in epsilons:
    expected, margins = worst_case_accuracy(params, batches, eps, norm)
    assert np.abs(margins).min() > 1e-4  # no example sits on the decision boundary
    assert out[f"pgd_{norm}/{eps:g}/accuracy"] == pytest.approx(expected, abs=1e-12), eps
    accs.append(expected)
  assert accs[-1] < accs[0]  # the largest budget does flip examples (29 real rows)


def test_pgd_eval_rejects_regression():
  with pytest.raises(ValueError, match="classification"):
    R.make_pgd_eval(linear_apply, "regression")


# ---------------------------------------------------------------------------------------------
# WordNet and the word-substitution attack


@pytest.fixture(scope="module")
def wordnet():
  if not (R.wordnet_dir() / "index.noun").is_file():
    pytest.skip("WordNet database missing: apt-get install wordnet-base")
  return R.WordNet()


def test_wordnet_reads_the_real_database(wordnet):
  # WordNet 3.0: movie.n.01 = {movie, film, picture, moving_picture, moving-picture_show, motion
  # picture, motion-picture_show, picture_show, pic, flick}; single words only.
  assert wordnet("movie") == ["film", "picture", "pic", "flick"]
  assert wordnet("Movie") == wordnet("movie")
  assert "dull" in wordnet("boring") and "tedious" in wordnet("boring")
  assert wordnet("movies") == []  # no morphological reduction
  assert R.WordNet(pos=("a",), max_senses=2)("good") == ["full"]  # good.a.01 = {good} alone
  with pytest.raises(FileNotFoundError, match="wordnet-base"):
    R.WordNet(root="/nonexistent")


WEIGHTS = {"good": 2.0, "great": 1.5, "bad": -2.0, "boring": -1.5}


def bow_proba(texts):
  """A linear bag-of-words sentiment classifier: p(pos) = sigmoid(sum of word weights - 0.1)."""
  s = np.array([sum(WEIGHTS.get(w, 0.0) for w in re.findall(r"[a-z]+", t.lower())) - 0.1
                for t in texts])
  p = 1.0 / (1.0 + np.exp(-s))
  return np.stack([1.0 - p, p], 1)


def test_greedy_synonym_attack_with_wordnet(wordnet):
  texts = ["A good movie with a great cast.", "good", "bad", "boring"]
  labels = [1, 1, 1, 0]
  res = R.word_substitution_attack(bow_proba, texts, labels, wordnet, max_swap_fraction=0.3)
  m = res.metrics
  # 1: 7 words -> budget 2; swapping "good" lowers p(pos) most, then "great": flipped.
  # 2: 1 word -> budget floor(0.3) = 0: survives. 3: misclassified, not attacked.
  # 4: budget 0 too: survives.
  assert m["clean_accuracy"] == 0.75
  assert m["attack_success_rate"] == pytest.approx(1 / 3)
  assert m["accuracy_under_attack"] == 0.5
  assert m["mean_swap_fraction"] == pytest.approx(2 / 7)
  r = res.examples[0]
  good_syn = [s for s in wordnet("good") if s not in WEIGHTS][0]
  great_syn = [s for s in wordnet("great") if s not in WEIGHTS][0]
  assert r["adversarial"] == f"A {good_syn} movie with a {great_syn} cast."
  assert [s[:2] for s in r["swaps"]] == [(1, "good"), (5, "great")]
  assert (r["clean_pred"], r["adv_pred"]) == (1, 0)
  # Queries: the clean text, then every (word, synonym) pair not yet swapped in each round.
  n = {w: len(wordnet(w)) for w in ("good", "movie", "great", "cast")}
  assert r["queries"] == 1 + sum(n.values()) + (n["movie"] + n["great"] + n["cast"])
  assert res.examples[1]["queries"] == 1 and res.examples[1]["swaps"] == []
  # A larger budget lets "boring" be swapped once, which lowers p(neg) without flipping it.
  res = R.word_substitution_attack(bow_proba, ["boring"], [0], wordnet, max_swap_fraction=1.0)
  (r,) = res.examples
  assert r["adversarial"] == wordnet("boring")[0] and r["adv_pred"] == 0
  assert res.metrics["attack_success_rate"] == 0.0 and res.metrics["accuracy_under_attack"] == 1.0
  # Capitalisation follows the replaced word.
  res = R.word_substitution_attack(bow_proba, ["Good"], [1], wordnet, max_swap_fraction=1.0)
  assert res.examples[0]["adversarial"] == good_syn.capitalize()


def test_text_classifier_and_attack_on_a_random_bert(wordnet, minilm_dir):
  """The text path end to end: the real MiniLM tokenizer, a tiny random BERT, WordNet swaps."""
  from transformers import AutoTokenizer
  from jaxft.models import init_random
  tok = AutoTokenizer.from_pretrained(str(minilm_dir))
  model = init_random({"model_type": "bert", "vocab_size": tok.vocab_size, "hidden_size": 32,
                       "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                       "max_position_embeddings": 64}, head="sequence_classification",
                      num_labels=2, seed=0)
  predict = R.text_classifier(model.apply, model.params, tok, max_length=16, batch_size=32)
  texts = ["a good movie", "a boring and terrible film with a dull plot", "fine"]
  probs = predict(texts)
  assert probs.shape == (3, 2)
  np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
  enc = tok(texts, padding="max_length", max_length=16, return_tensors="np")
  direct = jax.nn.softmax(model.apply(model.params, {k: np.asarray(v, np.int32)
                                                     for k, v in enc.items()}).logits, -1)
  np.testing.assert_allclose(probs, np.asarray(direct), rtol=1e-5, atol=1e-6)
  labels = np.argmax(probs, 1)  # attack the model's own predictions: every text starts correct
  res = R.word_substitution_attack(predict, texts, labels, wordnet, max_swap_fraction=0.5,
                                   max_candidates=4)
  assert res.metrics["clean_accuracy"] == 1.0
  for r in res.examples:
    assert len(r["swaps"]) <= int(0.5 * r["num_words"])
    for i, old, new in r["swaps"]:
      assert new in wordnet(old)
    # The reported prediction is the model's prediction on the adversarial text.
    assert r["adv_pred"] == int(np.argmax(predict([r["adversarial"]])[0]))
