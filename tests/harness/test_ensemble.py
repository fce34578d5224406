"""Ensembles and model soups (jaxft.eval.ensemble) on hand-computed values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft.eval import ensemble


def _tree(seed, dtype=jnp.float32):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {"backbone": {"layer_0": {"kernel": jax.random.normal(k1, (4, 3)).astype(dtype)}},
          "head": {"bias": jax.random.normal(k2, (3,)).astype(dtype)}}


def test_soup_of_identical_checkpoints_is_the_checkpoint():
  for dtype in (jnp.float32, jnp.bfloat16):
    t = _tree(0, dtype)
    soup = ensemble.uniform_soup([t, t, t, t, t])
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                           soup, t)
    assert jax.tree_util.tree_leaves(soup)[0].dtype == dtype
    greedy = ensemble.greedy_soup([t, t, t], lambda p: 0.5)
    assert greedy.ingredients == [0, 1, 2]  # ties join (Wortsman et al.: >=)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                           greedy.params, t)


def test_uniform_and_weighted_soup_are_means():
  a, b, c = _tree(0), _tree(1), _tree(2)
  soup = ensemble.uniform_soup([a, b, c])
  for x, y, z, s in zip(*(jax.tree_util.tree_leaves(t) for t in (a, b, c, soup))):
    np.testing.assert_allclose(np.asarray(s), (np.asarray(x) + np.asarray(y) + np.asarray(z)) / 3,
                               rtol=1e-6, atol=1e-6)
  w = ensemble.uniform_soup([a, b], weights=[3, 1])
  np.testing.assert_allclose(np.asarray(w["head"]["bias"]),
                             0.75 * np.asarray(a["head"]["bias"]) + 0.25 * np.asarray(b["head"]["bias"]),
                             rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="different parameter structure"):
    ensemble.uniform_soup([a, {"backbone": a["backbone"]}])


def test_greedy_soup_follows_the_recipe():
  # 1-D "models"; held-out score = -(theta - 1)^2. Individual scores: 0.8 -> -0.04 (best),
  # 1.4 -> -0.16, 3.0 -> -4, 1.1 -> -0.01 (actually best). Order: 1.1, 0.8, 1.4, 3.0.
  # soup {1.1, 0.8} = 0.95 -> -0.0025 kept; + 1.4 -> 1.1 -> -0.01 worse, dropped;
  # + 3.0 -> (1.1 + 0.8 + 3) / 3 = 1.633 -> worse, dropped.
  thetas = [0.8, 1.4, 3.0, 1.1]
  trees = [{"w": jnp.array([t], jnp.float32)} for t in thetas]
  score = lambda p: float(-(p["w"][0] - 1.0) ** 2)
  g = ensemble.greedy_soup(trees, score)
  assert g.ingredients == [3, 0]
  assert float(g.params["w"][0]) == pytest.approx(0.95, abs=1e-6)
  assert g.score == pytest.approx(-0.0025, abs=1e-6)
  assert [h[0] for h in g.history] == [3, 0, 1, 2] and [h[2] for h in g.history] == [True, True,
                                                                                     False, False]
  assert g.individual == pytest.approx([-0.04, -0.16, -4.0, -0.01], abs=1e-6)


def test_logit_and_probability_ensembles():
  l1 = np.array([[2.0, 0.0], [0.0, 1.0]])
  l2 = np.array([[0.0, 4.0], [0.0, 3.0]])
  np.testing.assert_allclose(ensemble.average_logits([l1, l2]), [[1.0, 2.0], [0.0, 2.0]])
  np.testing.assert_allclose(ensemble.average_logits([l1, l2], weights=[3, 1]),
                             [[1.5, 1.0], [0.0, 1.5]])
  p = ensemble.average_logits([l1, l2], probs=True)
  sm = lambda z: np.exp(z) / np.exp(z).sum(-1, keepdims=True)
  np.testing.assert_allclose(np.exp(p), (sm(l1) + sm(l2)) / 2, rtol=1e-6)
  acc = lambda logits, labels: {"accuracy": float(np.mean(logits.argmax(-1) == labels))}
  m = ensemble.ensemble_metrics([l1, l2], np.array([1, 1]), acc)
  assert m == {"accuracy": 1.0, "member_0/accuracy": 0.5, "member_1/accuracy": 1.0}
  with pytest.raises(ValueError, match="same examples"):
    ensemble.average_logits([l1, l2[:1]])
