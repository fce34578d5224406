"""Continual learning: EWC penalty and Fisher against their formulas, forgetting, a 2-task run."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxft.train import continual
from jaxft.train import multitask as mt
from test_multitask import synthetic_task, tiny_models  # tests/train is on sys.path under pytest


def test_ewc_penalty_matches_formula_and_its_gradient():
  rng = np.random.default_rng(0)
  theta = {"a": rng.normal(size=(3, 2)), "b": rng.normal(size=4)}
  anchors = [{k: rng.normal(size=v.shape) for k, v in theta.items()} for _ in range(2)]
  fishers = [{k: rng.random(v.shape) for k, v in theta.items()} for _ in range(2)]
  fishers[1] = {"a": fishers[1]["a"]}  # a later task may cover fewer parameters
  lam = 7.5
  hand = 0.0
  for anc, fis in zip(anchors, fishers):
    for k, f in fis.items():
      hand += np.sum(f * (theta[k] - anc[k]) ** 2)
  hand *= lam / 2
  j = lambda d: {k: jnp.asarray(v, jnp.float32) for k, v in d.items()}
  got = continual.ewc_penalty(j(theta), [j(a) for a in anchors], [j(f) for f in fishers], lam)
  assert float(got) == pytest.approx(hand, rel=1e-5)
  grad = jax.grad(lambda t: continual.ewc_penalty(t, [j(a) for a in anchors],
                                                  [j(f) for f in fishers], lam))(j(theta))
  expected_b = lam * fishers[0]["b"] * (theta["b"] - anchors[0]["b"])
  np.testing.assert_allclose(np.asarray(grad["b"]), expected_b, rtol=1e-4, atol=1e-6)
  with pytest.raises(KeyError, match="no parameter"):
    continual.ewc_penalty({"a": j(theta)["a"]}, [j(anchors[0])], [j(fishers[0])], lam)


def test_forgetting_on_a_hand_matrix():
  r = np.array([[0.9, np.nan, np.nan], [0.7, 0.8, np.nan], [0.6, 0.85, 0.95]])
  out = continual.forgetting(r)
  # task 0: max(0.9, 0.7) - 0.6 = 0.3; task 1: 0.8 - 0.85 = -0.05 (backward transfer)
  assert out["forgetting"] == pytest.approx([0.3, -0.05])
  assert out["average_forgetting"] == pytest.approx(0.125)
  assert out["average_accuracy"] == pytest.approx((0.6 + 0.85 + 0.95) / 3)


@pytest.fixture(scope="module")
def two_heads():
  return tiny_models({"a": 2, "b": 3})


def test_fisher_diagonal_is_the_mean_squared_per_example_gradient(two_heads):
  applies, params = two_heads
  state = mt.init_state(params, optax.sgd(0.1))
  task = synthetic_task("a", 2, 1, 5, 64, batch=4)
  b0 = task.batch_at(0)
  b0["example_mask"][3] = 0.0  # a padding row must not count
  batches = [b0, task.batch_at(1)]
  fisher = continual.fisher_diagonal(applies["a"], state.backbone, state.heads["a"], {}, batches,
                                     "classification")

  def logp(bb, ex):
    out = applies["a"](mt.task_view(bb, state.heads["a"]), {k: jnp.asarray(v)[None] for k, v in
                                                            ex.items()})
    return jax.nn.log_softmax(out.logits[0])[ex["labels"]]

  grad = jax.jit(jax.grad(logp))
  total = {k: np.zeros(v.shape) for k, v in state.backbone.items()}
  n = 0
  for b in batches:
    for i in range(4):
      if b["example_mask"][i] == 0:
        continue
      g = grad(state.backbone, {k: v[i] for k, v in b.items()})
      for k in total:
        total[k] += np.asarray(g[k], np.float64) ** 2
      n += 1
  assert n == 7
  for k in ("encoder/layer_0/attention/self/query/kernel", "embeddings/word_embeddings/embedding"):
    np.testing.assert_allclose(np.asarray(fisher[k]), total[k] / n, rtol=2e-4, atol=1e-9)
  assert all(float(jnp.min(v)) >= 0 for v in fisher.values())


def test_continual_run_reports_stages_replays_and_ewc(two_heads):
  applies, params = two_heads
  tasks = [synthetic_task("a", 2, 1, 5, 300, seed=0), synthetic_task("b", 3, 2, 8, 300, seed=7)]
  logs = []
  res = continual.train_continual(applies, params, tasks, lambda: optax.adam(1e-2), 30,
                                  replay=0.3, memory_batches=2, ewc_lambda=100.0, fisher_examples=32,
                                  log=lambda s, m: logs.append(m))
  assert res.matrix.shape == (2, 2) and np.isnan(res.matrix[0, 1])
  assert res.matrix[0, 0] >= 0.9  # task a learned in stage 0
  assert res.summary["forgetting"] == pytest.approx([res.matrix[0, 0] - res.matrix[1, 0]])
  # replay: stage 1 drew task a with probability 0.3 per step from its own seeded generator
  sampler = np.random.default_rng([0, 1])
  expected = 0
  for _ in range(30):
    if sampler.random() < 0.3:
      sampler.integers(1)
      expected += 1
  assert res.replayed[1] == {"a": expected} and 0 < expected < 30
  stage1 = [m for m in logs if m["stage"] == 1]
  assert sum(m["task"] == "a" for m in stage1) == expected
  # EWC is active in stage 1 only: its penalty is 0 at the anchor and grows as the encoder moves
  assert not any("loss/ewc" in m for m in logs if m["stage"] == 0)
  pen = [m["loss/ewc"] for m in stage1]
  assert pen[0] == 0.0 and max(pen) > 0.0
  assert set(res.stage_metrics[1]) == {"a", "b"}
