"""Multitask learning: temperature sampling against its formula, then a real tiny run through
jaxft.recipes.run (one build, the one loop) on SST-2 + STS-B (a 2-way head and a regression
head): per-task metrics, the task plan, exact resume, heads of other tasks untouched by a step, a
non-finite step skipped. Tiny random BERT with MiniLM's tokenizer, 8 steps."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
from jax.tree_util import DictKey

from jaxft import recipes
from jaxft.recipes import multitask as mt
from tests.reliability.reliability_runs import assert_trees_bitwise_equal, saved_state
from tests.train.test_loop import make_config, rows

TASKS = ["sst2", "stsb"]


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
  # The k-th time a task is drawn it trains on its k-th batch.
  np.testing.assert_array_equal(mt.positions([1, 0, 1, 1, 2, 0]), [0, 0, 1, 2, 0, 1])


def config_of(model_dir, shared_data, **extra):
  values = dict(multitask__tasks=",".join(TASKS), data__data_dir=str(shared_data / "glue"),
                data__max_eval_examples=16, train__num_steps=8, train__eval_every=4)
  return make_config(model_dir, **{**values, **extra})


def test_bad_configs_fail_before_any_work(tiny_bert_dir, shared_data, tmp_path):
  cases = [({"multitask__tasks": "sst2,mrcp"}, KeyError, "Did you mean 'mrpc'.*Known tasks"),
           ({"continual__tasks": "rte", "continual__steps_per_task": 2}, ValueError, "both set"),
           ({"multitask__temperature": 0.0}, ValueError, "temperature"),
           ({"objective__name": "rdrop"}, ValueError, "supervised"),
           ({"train__early_stopping_metric": "accuracy"}, ValueError, "sst2/accuracy")]
  for i, (extra, error, match) in enumerate(cases):
    with pytest.raises(error, match=match):
      recipes.run(config_of(tiny_bert_dir, shared_data, **extra), tmp_path / str(i))
  assert not any(tmp_path.iterdir())  # refused before a workdir was made


@pytest.fixture(scope="module")
def straight(tiny_bert_dir, shared_data, tmp_path_factory):
  """8 steps through jaxft.recipes.run, counting build() calls; keeps the Setup and a host copy
  of its initial state (the jitted step, compiled for both tasks, is reused by the tests)."""
  from jaxft.train import build as build_lib
  calls, kept = [], {}
  real_build, real_setup = build_lib.build, mt.setup

  def counting_build(*args, **kwargs):
    calls.append([p.name for p in kwargs.get("extra_parts", ())])
    return real_build(*args, **kwargs)

  def keeping_setup(config, devices=None):
    s = real_setup(config, devices=devices)
    kept.update(setup=s, state0=jax.device_get(s.state))
    return s

  config = config_of(tiny_bert_dir, shared_data)
  workdir = tmp_path_factory.mktemp("multitask") / "run"
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(build_lib, "build", counting_build)
    mp.setattr(mt, "setup", keeping_setup)
    results = recipes.run(config, workdir)
  return dict(config=config, workdir=workdir, results=results, build_calls=calls, **kept)


def test_run_reports_every_task_through_the_one_builder(straight):
  results, workdir = straight["results"], straight["workdir"]
  assert straight["build_calls"] == [["multitask"]]  # one build, with the recipe's part
  assert json.loads((workdir / "results.json").read_text()) == results
  ev = results["eval"]
  assert {"sst2/accuracy", "sst2/f1", "stsb/pearson", "stsb/spearman", "average"} <= set(ev)
  assert results["main_metric"] == "average" and results["task"] == "sst2+stsb"
  assert ev["average"] == pytest.approx((ev["sst2/accuracy"] + ev["stsb/pearson"]) / 2)
  assert [r["step"] for r in rows(workdir, "eval")] == [4, 8]
  # The plan: 64 examples each, T = 1 -> p = (1/2, 1/2), drawn from the run's seed.
  plan = mt.task_schedule(mt.sampling_probs([64, 64], 1.0), 8, seed=0)
  counts = np.bincount(plan, minlength=2)
  assert results["multitask"]["steps"] == {"sst2": int(counts[0]), "stsb": int(counts[1])}
  assert results["multitask"]["probs"] == {"sst2": 0.5, "stsb": 0.5}
  train = rows(workdir, "train")
  assert [r["step"] for r in train] == list(range(1, 9))
  for r, t in zip(train, plan):  # each step trained its planned task's term, and only that one
    losses = [k for k in r if k.startswith("sup/") and k.endswith("/loss")]
    assert losses == [f"sup/{TASKS[t]}/loss"]
    assert r[f"sup/{TASKS[t]}/loss"] == r["loss/sup"] == r["loss"]
  assert ("sup/sst2/accuracy" in train[int(np.argmax(plan == 0))])
  assert results["compilations"] == len(set(plan.tolist()))  # one trace per task (one bucket)
  assert results["last_train"]["skipped_steps"] == 0


@pytest.mark.slow
def test_resume_from_a_checkpoint_is_bitwise_the_straight_run(straight, tmp_path):
  """The straight run's workdir cut back to its step-4 checkpoint (as a crash after it leaves it),
  resumed: every later loss and the final state (params, optimizer, extras) are bitwise equal."""
  workdir = tmp_path / "run"
  shutil.copytree(straight["workdir"], workdir)
  (workdir / "results.json").unlink()
  shutil.rmtree(workdir / "checkpoints" / "latest" / "8")
  results = recipes.run(straight["config"], workdir)
  assert results["eval"] == straight["results"]["eval"]
  last = lambda w: {r["step"]: (r["loss"], r["grad_norm"]) for r in rows(w, "train")}
  assert last(workdir) == last(straight["workdir"])
  assert [r["step"] for r in rows(workdir, "train")][8:] == [5, 6, 7, 8]  # resumed at step 5
  step, state = saved_state(workdir)
  ref_step, ref_state = saved_state(straight["workdir"])
  assert step == ref_step == 8
  assert_trees_bitwise_equal(state, ref_state)


def _step_on(straight, task: str, corrupt=None):
  """One step of the run's jitted step from its initial state on the first batch of `task`."""
  from jaxft.train import mesh as mesh_lib
  from jaxft.train.setup import train_key
  s, state0 = straight["setup"], straight["state0"]
  plan = s.data.train.task
  batch = s.data.train.batch_at(int(np.argmax(plan == TASKS.index(task))))
  assert mt.task_of(batch) == task
  if corrupt:
    batch = corrupt(dict(batch))
  traces = s.trace_count[0]
  new, metrics = s.step_fn(jax.device_put(state0, s.state_shardings),
                           mesh_lib.put_batch(batch, s.mesh), train_key(s.config))
  assert s.trace_count[0] == traces  # the step compiled during the run serves these calls
  return state0, jax.device_get(new), jax.device_get(metrics)


def _under(tree, prefix):
  """Leaves of a pytree whose path has a dict key (a flat param key) starting with `prefix`."""
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
          if any(isinstance(k, DictKey) and str(k.key).startswith(prefix) for k in p)}


def test_a_step_leaves_the_other_tasks_head_and_its_optimizer_state_untouched(straight):
  old, new, metrics = _step_on(straight, "sst2")
  assert metrics["skipped_steps"] == 0 and int(new.step) == 1
  for part in ("trainable", "opt_state"):
    kept, now = _under(getattr(old, part), "head/stsb/"), _under(getattr(new, part), "head/stsb/")
    assert kept and kept.keys() == now.keys()
    for k in kept:
      assert kept[k].tobytes() == now[k].tobytes(), f"{part} {k} moved"
  # ... while the batch's head, its Adam moments and the encoder moved.
  moved = lambda prefix: any(not np.array_equal(a, b) for a, b in zip(
      _under(old.trainable, prefix).values(), _under(new.trainable, prefix).values()))
  assert moved("head/sst2/") and moved("backbone/")
  assert any(np.any(v != 0) for v in _under(new.opt_state, "head/sst2/").values())


def test_a_non_finite_step_is_skipped_bitwise(straight):
  def nan_labels(batch):
    batch["labels"] = np.full_like(batch["labels"], np.nan)
    return batch

  old, new, metrics = _step_on(straight, "stsb", corrupt=nan_labels)
  assert metrics["nonfinite"] == 1 and metrics["skipped_steps"] == 1
  assert int(new.step) == 1 and int(new.extras["skipped_steps"]) == 1
  assert_trees_bitwise_equal(new.trainable, old.trainable)
  assert_trees_bitwise_equal(new.opt_state, old.opt_state)


def test_jaxft_eval_scores_every_task_of_a_finished_run(straight, capsys):
  """`jaxft eval` rebuilds a multitask run through jaxft.recipes.setup_for; export refuses it."""
  from jaxft import cli
  workdir = straight["workdir"]
  assert cli.main(["eval", "--workdir", str(workdir), "--which", "latest"]) == 0
  printed = json.loads(capsys.readouterr().out)
  assert printed == pytest.approx(straight["results"]["eval"], rel=1e-5)
  assert cli.main(["export", "--workdir", str(workdir), "--out", str(workdir / "hf")]) == 2
  assert "multi-task run" in capsys.readouterr().err
