"""Fine-tune a few steps, save_pretrained, load in transformers (PyTorch): the same logits."""

import json

import jax
import numpy as np
import optax
import transformers as T

from jaxft.models import from_pretrained

import hf_tiny as tiny


def _train(m, b, labels, steps=4):
  """A few Adam steps of CE (with dropout on); returns params and the eval loss before/after."""
  tx = optax.adam(1e-2)

  def loss_fn(p, rng, deterministic):
    out = m.apply(p, b, rng=rng, deterministic=deterministic)
    logits, y = out.logits, labels
    if logits.ndim == 3:
      logits, y = logits.reshape(-1, logits.shape[-1]), y.reshape(-1)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step(p, opt, rng):
    g = jax.grad(loss_fn)(p, rng, False)
    upd, opt = tx.update(g, opt, p)
    return optax.apply_updates(p, upd), opt

  eval_loss = jax.jit(lambda p: loss_fn(p, None, True))
  params, opt = m.params, tx.init(m.params)
  before = float(eval_loss(params))
  for i in range(steps):
    params, opt = step(params, opt, jax.random.PRNGKey(i))
  return params, before, float(eval_loss(params))


def test_finetuned_sequence_classifier_round_trips_to_transformers(tmp_path):
  tiny.torch_model("bert").save_pretrained(tmp_path / "base")
  names = ["neg", "neutral", "pos"]
  m = from_pretrained(tmp_path / "base", head="sequence_classification", id2label=names)
  assert sorted(m.loading_info.missing) == ["classifier.bias", "classifier.weight"]
  b = tiny.batch("bert")
  params, before, after = _train(m, b, np.array([0, 2, 1]))
  assert after < before
  tuned = m.with_params(params)
  out = tuned.save_pretrained(tmp_path / "export")
  cfg = json.loads((out / "config.json").read_text())
  assert cfg["architectures"] == ["BertForSequenceClassification"]
  assert cfg["id2label"] == {"0": "neg", "1": "neutral", "2": "pos"}
  assert cfg["label2id"] == {"neg": 0, "neutral": 1, "pos": 2}
  want, ref = tiny.hf_logits(T.AutoModelForSequenceClassification, out, "bert", b)
  assert isinstance(ref, T.BertForSequenceClassification)
  np.testing.assert_allclose(np.asarray(tuned.logits(**b)), want, atol=1e-4, rtol=0)
  # And back into jaxft: bitwise the trained parameters.
  again = from_pretrained(out, head="sequence_classification")
  assert again.config.id2label == {0: "neg", 1: "neutral", 2: "pos"}
  jax.tree_util.tree_map(np.testing.assert_array_equal, again.params, jax.device_get(params))


def test_finetuned_token_classifier_round_trips_to_transformers(tmp_path):
  tiny.torch_model("roberta").save_pretrained(tmp_path / "base")
  m = from_pretrained(tmp_path / "base", head="token_classification", num_labels=5)
  b = tiny.batch("roberta")
  labels = np.random.RandomState(1).randint(0, 5, b["input_ids"].shape)
  params, before, after = _train(m, b, labels)
  assert after < before
  out = m.with_params(params).save_pretrained(tmp_path / "export")
  want, ref = tiny.hf_logits(T.AutoModelForTokenClassification, out, "roberta", b)
  assert isinstance(ref, T.RobertaForTokenClassification)
  got = np.asarray(m.with_params(params).logits(**b))
  assert got.shape == (3, 11, 5)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
