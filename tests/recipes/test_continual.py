"""Continual learning: EWC penalty, Fisher diagonal, forgetting and the stage plan against their
formulas; then a real tiny run through jaxft.recipes.run (SST-2, then STS-B; replay and EWC):
stage evals, the R matrix and forgetting in results.json, the stage-end hook (EWC row, fresh
optimizer), and a resume across the stage boundary that is bitwise the straight run."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft import recipes
from jaxft.recipes import continual
from jaxft.recipes import multitask as mt
from tests.reliability.reliability_runs import assert_trees_bitwise_equal, saved_state
from tests.train.test_loop import make_config, rows


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
  # Stages stacked on a leading axis (the run's extras) give the same penalty as the list.
  stack = lambda ds: {k: jnp.stack([jnp.asarray(d.get(k, np.zeros_like(theta[k])), jnp.float32)
                                    for d in ds]) for k in theta}
  got = continual.ewc_penalty(j(theta), [stack(anchors)], [stack(fishers)], lam)
  assert float(got) == pytest.approx(hand, rel=1e-5)
  with pytest.raises(KeyError, match="no parameter"):
    continual.ewc_penalty({"a": j(theta)["a"]}, [j(anchors[0])], [j(fishers[0])], lam)


def test_forgetting_on_a_hand_matrix():
  r = np.array([[0.9, np.nan, np.nan], [0.7, 0.8, np.nan], [0.6, 0.85, 0.95]])
  out = continual.forgetting(r)
  # task 0: max(0.9, 0.7) - 0.6 = 0.3; task 1: 0.8 - 0.85 = -0.05 (backward transfer)
  assert out["forgetting"] == pytest.approx([0.3, -0.05])
  assert out["average_forgetting"] == pytest.approx(0.125)
  assert out["average_accuracy"] == pytest.approx((0.6 + 0.85 + 0.95) / 3)


def test_stage_matrix_reads_the_stage_end_evals():
  history = [{"step": s, "metrics": m} for s, m in [
      (2, {"a/acc": 0.1}), (4, {"a/acc": 0.9}), (6, {"a/acc": 0.5, "b/f1": 0.2}),
      (8, {"a/acc": 0.7, "b/f1": 0.8})]]
  r = continual.stage_matrix(history, ["a", "b"], ["acc", "f1"], steps_per_task=4)
  np.testing.assert_array_equal(r, [[0.9, np.nan], [0.7, 0.8]])


def test_stage_plan_replays_from_its_seeded_generator():
  task, index = continual.stage_plan(3, 50, replay=0.3, memory_batches=2, seed=5)
  assert (task[:50] == 0).all() and (index[:50] == np.arange(50)).all()
  for k in (1, 2):  # each stage's draws, redone by hand from default_rng([seed, k])
    sampler, want = np.random.default_rng([5, k]), []
    for _ in range(50):
      want.append(int(sampler.integers(k)) if sampler.random() < 0.3 else k)
    got = task[50 * k:50 * (k + 1)]
    np.testing.assert_array_equal(got, want)
    idx = index[50 * k:50 * (k + 1)]
    np.testing.assert_array_equal(idx[got == k], np.arange(np.sum(got == k)))  # own batches walk
    for j in range(k):  # replays cycle through the first memory_batches batches of task j
      np.testing.assert_array_equal(idx[got == j], np.arange(np.sum(got == j)) % 2)
  assert 0 < np.sum(task[50:] != np.repeat([1, 2], 50)) < 50
  assert continual.replayed(task, 50, ["a", "b", "c"])[2] == {
      "a": int(np.sum(task[100:] == 0)), "b": int(np.sum(task[100:] == 1))}


def test_fisher_diagonal_is_the_mean_squared_per_example_gradient():
  from jaxft.core.state import flatten, merge_params
  from jaxft.models import init_random
  tiny = {"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 1,
          "num_attention_heads": 2, "intermediate_size": 32, "vocab_size": 30,
          "max_position_embeddings": 16}
  model = mt.MultiHeadModel.combine({
      t: init_random(tiny, head="sequence_classification", num_labels=n, seed=0)
      for t, n in (("a", 2), ("b", 3))})
  trainable = flatten(model.params)
  rng = np.random.default_rng(0)
  batches = []
  for _ in range(2):
    ids = rng.integers(5, 30, (4, 8)).astype(np.int32)
    batches.append(mt.mark({"input_ids": ids, "attention_mask": np.ones_like(ids),
                            "token_type_ids": np.zeros_like(ids),
                            "labels": rng.integers(0, 2, 4).astype(np.int32),
                            "example_mask": np.ones(4, np.float32)}, "a"))
  batches[0]["example_mask"][3] = 0.0  # a padding row must not count
  keys = [k for k in trainable if k.startswith("backbone/")]
  fisher = continual.fisher_diagonal(model.apply, trainable, {}, batches, "classification",
                                     keys=keys, chunk=2)
  assert sorted(fisher) == sorted(keys)

  def logp(w, ex):
    out = model.apply(merge_params({**trainable, **w}, {}),
                      {k: jnp.asarray(v)[None] for k, v in ex.items()})
    return jax.nn.log_softmax(out.logits[0])[ex["labels"]]

  grad = jax.jit(jax.grad(logp))
  total = {k: np.zeros(trainable[k].shape) for k in keys}
  n = 0
  for b in batches:
    for i in range(4):
      if b["example_mask"][i] == 0:
        continue
      g = grad({k: trainable[k] for k in keys}, {k: v[i] for k, v in b.items()})
      for k in total:
        total[k] += np.asarray(g[k], np.float64) ** 2
      n += 1
  assert n == 7
  for k in ("backbone/encoder/layer_0/attention/self/query/kernel",
            "backbone/embeddings/word_embeddings/embedding"):
    np.testing.assert_allclose(np.asarray(fisher[k]), total[k] / n, rtol=2e-4, atol=1e-9)
  assert all(float(jnp.min(v)) >= 0 for v in fisher.values())


SPT = 4  # steps per stage


def config_of(model_dir, shared_data, **extra):
  values = dict(continual__tasks="sst2,stsb", continual__steps_per_task=SPT,
                continual__replay=0.5, continual__memory_batches=2, continual__ewc_lambda=100.0,
                continual__fisher_examples=16, data__data_dir=str(shared_data / "glue"),
                data__max_eval_examples=16, train__num_steps=0, train__eval_every=0,
                train__checkpoint_every=2, train__keep_checkpoints=4)
  return make_config(model_dir, **{**values, **extra})


def test_bad_configs_fail_before_any_work(tiny_bert_dir, shared_data, tmp_path):
  cases = [({"continual__steps_per_task": 0}, "steps_per_task must be > 0"),
           ({"continual__replay": 1.0}, "probability"),
           ({"train__num_steps": 5}, "make 8 steps"),
           ({"train__eval_every": 3}, "must divide"),
           ({"train__early_stopping_patience": 2}, "must be 0"),
           ({"self_training__rounds": 1}, "recipe of its own")]
  for i, (extra, match) in enumerate(cases):
    with pytest.raises(ValueError, match=match):
      recipes.run(config_of(tiny_bert_dir, shared_data, **extra), tmp_path / str(i))
  assert not any(tmp_path.iterdir())


@pytest.fixture(scope="module")
def straight(tiny_bert_dir, shared_data, tmp_path_factory):
  """2 stages x 4 steps through jaxft.recipes.run; keeps the Setup and its initial state."""
  kept = {}
  real_setup = continual.setup

  def keeping_setup(config, devices=None):
    s = real_setup(config, devices=devices)
    kept.update(setup=s, state0=jax.device_get(s.state))
    return s

  config = config_of(tiny_bert_dir, shared_data)
  workdir = tmp_path_factory.mktemp("continual") / "run"
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(continual, "setup", keeping_setup)
    results = recipes.run(config, workdir)
  return dict(config=config, workdir=workdir, results=results, **kept)


def test_stages_evaluate_the_tasks_seen_and_report_forgetting(straight):
  results, workdir = straight["results"], straight["workdir"]
  assert json.loads((workdir / "results.json").read_text()) == results
  evals = rows(workdir, "eval")
  assert [r["step"] for r in evals] == [4, 8]
  assert "eval/sst2/accuracy" in evals[0] and not any(k.startswith("eval/stsb/") for k in evals[0])
  r00, r10, r11 = (evals[0]["eval/sst2/accuracy"], evals[1]["eval/sst2/accuracy"],
                   evals[1]["eval/stsb/pearson"])
  cl = results["continual"]
  assert cl["matrix"] == [[r00, None], [r10, r11]]
  assert cl["average_accuracy"] == pytest.approx((r10 + r11) / 2)
  assert cl["average_forgetting"] == pytest.approx(r00 - r10) == cl["forgetting"][0]
  for which in ("eval", "best"):  # for jaxft table --metric; the final model is the result
    assert results[which]["average_accuracy"] == cl["average_accuracy"]
    assert results[which]["average_forgetting"] == cl["average_forgetting"]
  assert results["best_step"] == 8 and results["eval"]["average"] == pytest.approx((r10 + r11) / 2)

  # Stage 1 replays SST-2 as planned; each step trains its planned task.
  task, _ = continual.stage_plan(2, SPT, replay=0.5, memory_batches=2, seed=0)
  assert cl["replayed"] == [{}, {"sst2": int(np.sum(task[SPT:] == 0))}]
  train = rows(workdir, "train")
  for r, t in zip(train, task):
    assert f"sup/{['sst2', 'stsb'][t]}/loss" in r
  # EWC: no penalty in stage 0 (the Fisher rows are zeros), 0 at stage 1's first step (params
  # at the anchor), then positive as the encoder moves; the optimizer restarts with stage 1.
  ewc = [r["loss/ewc"] for r in train]
  assert ewc[:SPT + 1] == [0.0] * (SPT + 1) and min(ewc[SPT + 1:]) > 0
  assert train[SPT]["lr"] == train[0]["lr"] and train[SPT + 1]["lr"] == train[1]["lr"]


def test_the_stage_end_fills_the_ewc_row_and_restarts_the_optimizer(straight):
  s, state0 = straight["setup"], straight["state0"]
  _, before = saved_state(straight["workdir"], step=2)
  _, after = saved_state(straight["workdir"], step=4)  # saved after the stage-end hook
  counts = lambda st: {int(x) for x in jax.tree_util.tree_leaves(st["opt_state"])
                       if np.issubdtype(np.asarray(x).dtype, np.integer)}
  assert counts(before) == {2} and counts(after) == {0}
  anchors, fishers = after["extras"][continual.ANCHORS], after["extras"][continual.FISHERS]
  assert sorted(anchors) == sorted(k for k in state0.trainable if k.startswith("backbone/"))
  for k, row in anchors.items():
    assert row.shape == (1,) + state0.trainable[k].shape
    assert row[0].tobytes() == np.asarray(after["trainable"][k]).tobytes()  # theta* of stage 0
  # The Fisher row is task 0's (SST-2) diagonal Fisher at theta*, over its first 16 examples.
  bundle = s.data.bundles["sst2"]
  want = continual.fisher_diagonal(
      s.apply_fn, {k: np.asarray(v) for k, v in after["trainable"].items()}, state0.frozen,
      (mt.mark(bundle.train.batch_at(i), "sst2") for i in range(100)), "classification",
      keys=sorted(anchors), rng=jax.random.fold_in(jax.random.key(0), 0), max_examples=16)
  for k in want:
    np.testing.assert_allclose(fishers[k][0], np.asarray(want[k]), rtol=1e-5, atol=1e-12)
  assert max(float(np.max(f)) for f in fishers.values()) > 0


@pytest.mark.slow
def test_resume_across_the_stage_end_is_bitwise_the_straight_run(straight, tmp_path):
  """Cut back to the step-2 checkpoint (as a crash at step 3 leaves it) and resumed: the stage-end
  hook runs again in the resumed run, and every later loss and the final state (params,
  optimizer, EWC rows) are bitwise the straight run's."""
  workdir = tmp_path / "run"
  shutil.copytree(straight["workdir"], workdir)
  (workdir / "results.json").unlink()
  for step in (4, 6, 8):
    shutil.rmtree(workdir / "checkpoints" / "latest" / str(step))
  results = recipes.run(straight["config"], workdir)
  assert [r["step"] for r in rows(workdir, "train")][8:] == [3, 4, 5, 6, 7, 8]
  last = lambda w: {r["step"]: (r["loss"], r["grad_norm"]) for r in rows(w, "train")}
  assert last(workdir) == last(straight["workdir"])
  assert results["continual"] == straight["results"]["continual"]
  _, state = saved_state(workdir)
  _, ref = saved_state(straight["workdir"])
  assert_trees_bitwise_equal(state, ref)
