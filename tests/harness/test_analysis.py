"""Analysis: per-class report, confusion matrix, ECE on a hand example, integrated gradients."""

import numpy as np
import pytest

from jaxft.harness import analysis


def _logits_from_probs(p):
  return np.log(np.asarray(p, np.float64))


def test_ece_hand_example():
  # 2 classes; confidences 0.9 (correct), 0.9 (wrong), 0.62 (correct), 0.55 (wrong), 0.55 (correct)
  probs = [[0.9, 0.1], [0.9, 0.1], [0.38, 0.62], [0.55, 0.45], [0.45, 0.55]]
  labels = [0, 1, 1, 1, 1]
  cal = analysis.calibration(_logits_from_probs(probs), labels)
  # bins of width 1/15: 0.9 -> (0.8667, 0.9333]; 0.62 -> (0.6, 0.6667]; 0.55 -> (0.5333, 0.6]
  # ECE = 2/5 |0.5 - 0.9| + 1/5 |1 - 0.62| + 2/5 |0.5 - 0.55| = 0.16 + 0.076 + 0.02 = 0.256
  assert cal["ece"] == pytest.approx(0.256, abs=1e-12)
  counts = {round(b["low"] * 15): b["count"] for b in cal["bins"] if b["count"]}
  assert counts == {13: 2, 9: 1, 8: 2}
  assert sum(b["count"] for b in cal["bins"]) == 5
  perfect = analysis.calibration(_logits_from_probs([[1.0 - 1e-12, 1e-12]] * 3), [0, 0, 0])
  assert perfect["ece"] == pytest.approx(0.0, abs=1e-9)


def test_report_and_confusion_by_hand(tmp_path):
  logits = np.eye(3)[[0, 0, 1, 2, 2, 1]] * 3.0
  labels = np.array([0, 1, 1, 2, 0, 1])
  m = analysis.confusion(logits, labels)
  np.testing.assert_array_equal(m, [[1, 0, 1], [1, 2, 0], [0, 0, 1]])
  rep = analysis.classification_report(logits, labels, ["a", "b", "c"])
  # class a: predicted twice, right once -> precision 1/2; 2 true a, 1 found -> recall 1/2
  assert rep["a"]["precision"] == pytest.approx(0.5) and rep["a"]["recall"] == pytest.approx(0.5)
  assert rep["b"]["precision"] == pytest.approx(1.0) and rep["b"]["recall"] == pytest.approx(2 / 3)
  assert rep["b"]["f1-score"] == pytest.approx(0.8) and rep["b"]["support"] == 3
  assert rep["accuracy"] == pytest.approx(4 / 6)
  png = analysis.plot_confusion(m, tmp_path / "c.png", ["a", "b", "c"])
  assert png.read_bytes()[:4] == b"\x89PNG"
  rel = analysis.plot_reliability(analysis.calibration(logits, labels), tmp_path / "r.png")
  assert rel.stat().st_size > 1000
  with pytest.raises(ValueError, match="logits"):
    analysis.calibration(logits[:, None], labels)


@pytest.fixture(scope="module")
def tiny_bert():
  from jaxft.models import init_random
  return init_random({"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2,
                      "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 100,
                      "max_position_embeddings": 32}, head="sequence_classification",
                     num_labels=3, seed=1)


def test_integrated_gradients_completeness_and_padding(tiny_bert):
  import jax
  import jax.numpy as jnp
  # non-zero biases, so F(0) is not trivially 0 and the path is genuinely nonlinear
  params = jax.tree_util.tree_map(
      lambda x: x + 0.3 * jax.random.normal(jax.random.key(x.size), x.shape, x.dtype),
      tiny_bert.params)
  rng = np.random.default_rng(0)
  ids = rng.integers(5, 100, size=(2, 10)).astype(np.int32)
  mask = np.ones((2, 10), np.int32)
  mask[1, 6:] = 0
  batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
  attr, fx = analysis.integrated_gradients(tiny_bert.apply, params, batch, steps=32)
  assert attr.shape == (2, 10)
  # Completeness (Sundararajan et al. 2017): sum_i attr_i = F(x) - F(baseline)
  np.testing.assert_allclose(attr.sum(1), fx[0] - fx[1], rtol=0.02, atol=2e-3)
  assert np.all(attr[1, 6:] == 0.0)
  assert np.abs(fx[0] - fx[1]).min() > 1e-2  # the check is not vacuous
  # baseline really is the zero embedding: F(0) equals a forward with embeddings replaced by 0
  out = tiny_bert.apply(params, {k: jnp.asarray(v) for k, v in batch.items()})
  zero = tiny_bert.apply(params, {k: jnp.asarray(v) for k, v in batch.items()},
                         embedding_perturbation=-out.embeddings).logits
  target = np.asarray(out.logits).argmax(-1)
  np.testing.assert_allclose(fx[1], np.asarray(zero)[np.arange(2), target], rtol=1e-5, atol=1e-6)
  # an explicit target explains that class instead
  attr0, fx0 = analysis.integrated_gradients(tiny_bert.apply, params, batch, targets=[0, 0], steps=8)
  np.testing.assert_allclose(fx0[0], np.asarray(out.logits)[:, 0], rtol=1e-5, atol=1e-6)

  page = analysis.attribution_html([["[CLS]", "<b>", "good"], ["bad"]], attr, titles=["one", "two"])
  assert "&lt;b&gt;" in page and "<h4>one</h4>" in page and page.count("class='t'") == 4
