"""Multitask learning: temperature sampling probabilities, per-task steps, per-task metrics."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxft.objectives.supervised import task_term
from jaxft.train import multitask as mt

TINY = {"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 32, "vocab_size": 30, "max_position_embeddings": 16}
SEQ = 8


def synthetic_task(name, num_labels, position, first_token, num_examples, batch=16, seed=0):
  """Label = which of `num_labels` tokens (first_token + c) sits at `position`; rest random noise."""

  def make(key):
    rng = np.random.default_rng(key)
    labels = rng.integers(0, num_labels, batch).astype(np.int32)
    ids = rng.integers(15, 30, (batch, SEQ)).astype(np.int32)
    ids[:, 0] = 1
    ids[:, position] = first_token + labels
    return {"input_ids": ids, "attention_mask": np.ones_like(ids),
            "token_type_ids": np.zeros_like(ids), "labels": labels,
            "example_mask": np.ones(batch, np.float32)}

  return mt.TaskData(name=name, kind="classification", num_examples=num_examples,
                     batch_at=lambda i: make([seed, i]),
                     eval_batches=lambda: [make([seed + 1000, i]) for i in range(2)],
                     main_metric="accuracy")


def tiny_models(labels_by_task):
  """One init_random model per task from the same seed: the same backbone, heads of their size."""
  from jaxft.models import init_random
  models = {t: init_random(TINY, head="sequence_classification", num_labels=n, seed=0)
            for t, n in labels_by_task.items()}
  first = next(iter(models.values()))
  params = mt.combine_heads(first.params["backbone"], {t: m.params["head"] for t, m in models.items()})
  return {t: m.apply for t, m in models.items()}, params


@pytest.fixture(scope="module")
def two_heads():
  return tiny_models({"a": 2, "b": 3})


def test_sampling_probabilities_match_the_formula():
  sizes = [100, 400, 1600]
  np.testing.assert_allclose(mt.sampling_probs(sizes, 1.0), np.array(sizes) / 2100, rtol=1e-12)
  np.testing.assert_allclose(mt.sampling_probs(sizes, 2.0), np.array([10, 20, 40]) / 70, rtol=1e-12)
  for t in (0.5, 3.0, 5.0):
    w = np.array(sizes, np.float64) ** (1 / t)
    np.testing.assert_allclose(mt.sampling_probs(sizes, t), w / w.sum(), rtol=1e-12)
  np.testing.assert_allclose(mt.sampling_probs(sizes, 1e9), [1 / 3] * 3, rtol=1e-6)
  assert np.isfinite(mt.sampling_probs([10**9, 1], 0.01)).all()
  sched = mt.task_schedule(mt.sampling_probs(sizes, 2.0), 20_000, seed=3)
  np.testing.assert_allclose(np.bincount(sched) / 20_000, np.array([1, 2, 4]) / 7, atol=0.012)
  np.testing.assert_array_equal(sched, mt.task_schedule(mt.sampling_probs(sizes, 2.0), 20_000, 3))
  with pytest.raises(ValueError, match="temperature"):
    mt.sampling_probs(sizes, 0.0)
  with pytest.raises(ValueError, match="positive"):
    mt.sampling_probs([3, 0], 1.0)


def test_task_step_updates_backbone_and_its_head_only(two_heads):
  applies, params = two_heads
  tx = optax.sgd(0.1)
  state = mt.init_state(params, tx)
  task = synthetic_task("a", 2, 1, 5, 64)
  batch = {k: jnp.asarray(v) for k, v in task.batch_at(0).items()}
  step = jax.jit(mt.make_task_step(applies["a"], "a", mt.supervised_terms("classification"), tx))
  new, metrics = step(state, batch, jax.random.key(0))

  # reference: gradient of the task loss on the {"backbone", "head"} view, plain SGD
  def loss(bb, head):
    return task_term("classification")(applies["a"], mt.task_view(bb, head), batch,
                                       jax.random.fold_in(jax.random.fold_in(jax.random.key(0), 0), 0),
                                       None)[0]

  g_b, g_h = jax.grad(loss, argnums=(0, 1))(state.backbone, state.heads["a"])
  for k in state.backbone:
    np.testing.assert_allclose(np.asarray(new.backbone[k]),
                               np.asarray(state.backbone[k] - 0.1 * g_b[k]), rtol=1e-5, atol=1e-6)
  for k in state.heads["a"]:
    np.testing.assert_allclose(np.asarray(new.heads["a"][k]),
                               np.asarray(state.heads["a"][k] - 0.1 * g_h[k]), rtol=1e-5, atol=1e-6)
  for k in state.heads["b"]:  # the other task's head is untouched, bit for bit
    np.testing.assert_array_equal(np.asarray(new.heads["b"][k]), np.asarray(state.heads["b"][k]))
  assert int(new.step) == 1 and float(metrics["loss"]) > 0


def test_train_multitask_counts_and_learns_both_tasks(two_heads):
  applies, params = two_heads
  tasks = [synthetic_task("a", 2, 1, 5, 300, seed=0), synthetic_task("b", 3, 2, 8, 100, seed=7)]
  steps = 90
  state, hist = mt.train_multitask(applies, params, tasks, optax.adam(1e-2), steps, temperature=2.0,
                                   seed=1)
  p = np.sqrt([300, 100]) / np.sqrt([300, 100]).sum()
  assert [hist["probs"]["a"], hist["probs"]["b"]] == pytest.approx(p.tolist())
  expected = np.bincount(mt.task_schedule(p, steps, 1), minlength=2)
  assert hist["counts"] == {"a": int(expected[0]), "b": int(expected[1])}
  assert hist["final"]["a"]["accuracy"] >= 0.9, hist["final"]
  assert hist["final"]["b"]["accuracy"] >= 0.9, hist["final"]
  with pytest.raises(KeyError, match="no head"):
    mt.train_multitask(applies, params, [synthetic_task("c", 2, 1, 5, 10)], optax.adam(1e-2), 1)
