"""Adaptive pseudo-label selection (FlexMatch, FreeMatch, SoftMatch, distribution alignment): the
rules and running statistics against numpy hand computations on fixed logits, the state's trip
through the extras of a real step, and one step of a tiny random BERT with every term."""

import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jaxft.objectives import adaptive as A
from jaxft.objectives import consistency as C
from jaxft.objectives import registry
from jaxft.objectives.base import StepContext, make_step
from jaxft.core.state import TrainState, split_params
from jaxft.train.averaging import chain_update_extras

from tests.objectives.test_consistency import (CLS, FAST_COMPILE, STRONG, UMASK, WEAK,
                                               fixed_apply, np_ce, np_softmax, options, run_term,
                                               semi_batch, token_batch)

TRUTH = np.array([0, 1, 1, 2], np.int32)  # the pool's true labels of WEAK's rows (diagnostics)


def build(name, **overrides):
  return registry.build(ml_collections.ConfigDict({"name": name, name: options(name, **overrides)}),
                        CLS)


def ctx_for(obj, **state):
  """A StepContext holding obj's initial extras, with `state` entries replaced."""
  extras = obj.init_extras({}, {})
  name = next(iter(extras))
  extras[name] = {**extras[name], **{k: jnp.asarray(v, jnp.float32) for k, v in state.items()}}
  return StepContext(jnp.zeros((), jnp.int32), extras)


def state_of(metrics, name):
  return {k: np.asarray(v) for k, v in A.reported(metrics, name).items()}


def np_wmean(x, w):
  return (x * w.reshape(w.shape + (1,) * (x.ndim - 1))).sum(0) / w.sum()


def np_align(p, p_model, p_target):
  a = p * (p_target + 1e-6) / (p_model + 1e-6)
  return a / a.sum(-1, keepdims=True)


# --------------------------------------------------------------------------------- rules, by hand


def test_flexmatch_class_rates_thresholds_and_memory():
  memory = jnp.array([0.2, 0.1, 0.0, 0.7])  # class shares, then never confident
  np.testing.assert_allclose(A.flex_class_rates(memory, warmup=True), [2 / 7, 1 / 7, 0], rtol=1e-6)
  beta = A.flex_class_rates(memory, warmup=False)
  np.testing.assert_allclose(beta, [1.0, 0.5, 0.0], rtol=1e-6)
  np.testing.assert_allclose(A.flex_thresholds(0.9, beta), [0.9, 0.3, 0.0], rtol=1e-6)
  assert np.all(np.asarray(A.flex_class_rates(jnp.array([0.0, 0.0, 0.0, 1.0]), True)) == 0)
  # First pass (10-row pool, 4 fresh rows, 2 + 1 confident): exactly USB's memory.
  m, v = A.flex_memory_update(jnp.array([0.0, 0, 0, 1]), 0.0, jnp.array([2.0, 1, 0]), 4.0, 10)
  np.testing.assert_allclose(m, [0.2, 0.1, 0.0, 0.7], rtol=1e-6)
  assert float(v) == 4.0
  # Half of the next 4 rows are fresh: 2 confident of class 2 take 1 slot from "never
  # confident" and 1 spread like the memory.
  m, v = A.flex_memory_update(memory, 8.0, jnp.array([0.0, 0, 2]), 4.0, 10)
  np.testing.assert_allclose(m, [0.18, 0.09, 0.2, 0.53], rtol=1e-5)
  assert float(v) == 10.0 and abs(float(m.sum()) - 1.0) < 1e-6


def test_distribution_alignment_on_a_known_distribution():
  p = jnp.array([[0.5, 0.3, 0.2]])
  np.testing.assert_allclose(A.align(p, jnp.array([0.5, 0.25, 0.25]), jnp.full(3, 1 / 3)),
                             [[1 / 3, 0.4, 0.8 / 3]], rtol=1e-5)
  # A model that over-predicts class 0 on the batch: with p_model = the batch mean itself and a
  # uniform target, each row is divided by the bias, then renormalised.
  probs = jnp.array([[0.7, 0.2, 0.1], [0.5, 0.1, 0.4], [0.6, 0.3, 0.1]])
  w = jnp.array([1.0, 1.0, 0.0])  # the last row only pads
  da = A.DistAlign("uniform", decay=0.5)
  state = da.init(3)
  aligned, s1 = da(state, probs, w, {}, None, None, None)
  mean = np.array([0.6, 0.15, 0.25])  # over the real rows; the first batch sets p_model
  np.testing.assert_allclose(s1["da_model"], mean, rtol=1e-6)
  np.testing.assert_allclose(aligned, np_align(np.asarray(probs), mean, np.full(3, 1 / 3)),
                             rtol=1e-5)
  np.testing.assert_allclose(s1["da_target"], np.full(3, 1 / 3), rtol=1e-6)
  _, s2 = da(s1, probs[::-1], w, {}, None, None, None)
  np.testing.assert_allclose(s2["da_model"], 0.5 * mean + 0.5 * np.array([0.55, 0.2, 0.25]),
                             rtol=1e-6)
  assert float(s2["da_updates"]) == 2.0
  # "labels": the target follows the labeled batch's label histogram.
  batch = {"input_ids": np.ones((4, 2), np.int32), "labels": np.array([0, 0, 2, 1], np.int32),
           "example_mask": np.array([1, 1, 1, 0], np.float32)}
  _, s = A.DistAlign("labels", decay=0.5)(state, probs, w, batch, None, None, None)
  np.testing.assert_allclose(s["da_target"], 0.5 / 3 + 0.5 * np.array([2 / 3, 0, 1 / 3]), rtol=1e-6)


def test_flexmatch_term_by_hand():
  obj = build("flexmatch", threshold=0.6, threshold_warmup=False, pool_size=10)
  memory = np.array([0.5, 0.1, 0.4, 0.0], np.float32)
  ctx = ctx_for(obj, memory=memory, visited=10.0)
  batch = {**semi_batch(), "unlabeled/labels": TRUTH}
  loss, m = run_term(obj.terms["unsup"].term, batch, ctx=ctx)
  p = np_softmax(WEAK)
  conf, pseudo = p.max(-1), p.argmax(-1)
  beta = np.array([1.0, 0.2, 0.8])  # class shares over the largest
  thr = 0.6 * beta / (2 - beta)
  mask = (conf >= thr[pseudo]).astype(np.float32)
  assert mask[:3].tolist() == [1, 0, 1]  # row 1 (class 2 at 0.37) misses its threshold 0.4
  np.testing.assert_allclose(loss, (np_ce(STRONG, pseudo) * mask * UMASK).sum() / 3, rtol=1e-5)
  np.testing.assert_allclose([m["mask_rate"], m["threshold"], m["unused"]],
                             [2 / 3, thr.mean(), 0.0], rtol=1e-5)
  np.testing.assert_allclose(m["pseudo_label_accuracy"], 1.0)  # rows 0 and 2 are right
  # The memory after the batch: rows 0 and 2 are confident (>= tau = 0.6), the pool was seen.
  new = state_of(m, "flexmatch")
  np.testing.assert_allclose(new["memory"], memory + (np.array([1, 1, 0, 0]) - 2 * memory) / 10,
                             rtol=1e-5)
  assert float(new["visited"]) == 10.0
  # At the start nothing was confident: every threshold is 0 and every row counts.
  _, m0 = run_term(obj.terms["unsup"].term, batch, ctx=ctx_for(obj))
  assert float(m0["mask_rate"]) == 1.0 and float(m0["threshold"]) == 0.0
  np.testing.assert_allclose(state_of(m0, "flexmatch")["memory"], [0.1, 0.1, 0, 0.8], rtol=1e-5)


def test_freematch_term_by_hand():
  obj = build("freematch", ema_decay=0.5, fairness_weight=0.3, weight=2.0)
  prior = {"time_p": 0.8, "p_model": np.array([0.5, 0.2, 0.3]),
           "label_hist": np.array([0.6, 0.1, 0.3])}
  loss, m = run_term(obj.terms["unsup"].term, semi_batch(), ctx=ctx_for(obj, **prior))
  p, w = np_softmax(WEAK), UMASK
  conf, pseudo = p.max(-1), p.argmax(-1)
  time_p = 0.5 * prior["time_p"] + 0.5 * np_wmean(conf, w)
  p_model = 0.5 * prior["p_model"] + 0.5 * np_wmean(p, w)
  label_hist = 0.5 * prior["label_hist"] + 0.5 * np_wmean(np.eye(3)[pseudo], w)
  thr = time_p * p_model / p_model.max()
  mask = (conf >= thr[pseudo]).astype(np.float32)
  assert mask[:3].tolist() == [1, 0, 1]
  lu = (np_ce(STRONG, pseudo) * mask * w).sum() / w.sum()
  keep = mask * w
  q = np_softmax(STRONG)
  hist_s = np_wmean(np.eye(3)[q.argmax(-1)], keep)
  a = p_model / label_hist
  a = a / a.sum()
  b = np_wmean(q, keep) * np.where(hist_s > 0, 1 / np.where(hist_s > 0, hist_s, 1), 0)
  b = b / b.sum()
  lf = np.sum(a * np.log(b + 1e-12))
  np.testing.assert_allclose([m["consistency"], m["fairness"]], [lu, lf], rtol=1e-5)
  np.testing.assert_allclose(loss, lu + 0.3 / 2.0 * lf, rtol=1e-5)  # weight * loss adds 0.3 L_f
  np.testing.assert_allclose([m["global_threshold"], m["threshold"], m["mask_rate"]],
                             [time_p, thr.mean(), 2 / 3], rtol=1e-5)
  new = state_of(m, "freematch")
  for k, want in {"time_p": time_p, "p_model": p_model, "label_hist": label_hist}.items():
    np.testing.assert_allclose(new[k], want, rtol=1e-5, err_msg=k)
  # Nothing kept: no fairness loss, and a finite (zero) gradient.
  zero = lambda z: A.fairness_loss(z, jnp.zeros(4), jnp.asarray(p_model), jnp.asarray(label_hist))
  assert float(zero(STRONG)) == 0.0 and np.all(np.asarray(jax.grad(zero)(STRONG)) == 0.0)
  # From the paper's start (1/C) the first thresholds are low; USB's code starts the EMAs at 1.
  _, m0 = run_term(obj.terms["unsup"].term, semi_batch(), ctx=ctx_for(obj))
  np.testing.assert_allclose(m0["global_threshold"], 0.5 / 3 + 0.5 * np_wmean(conf, w), rtol=1e-5)
  assert float(m0["mask_rate"]) == 1.0
  _, m1 = run_term(build("freematch", ema_decay=0.5, state_init="ones").terms["unsup"].term,
                   semi_batch(), ctx=ctx_for(build("freematch", state_init="ones")))
  np.testing.assert_allclose(m1["global_threshold"], 0.5 + 0.5 * np_wmean(conf, w), rtol=1e-5)


def test_softmatch_term_by_hand():
  obj = build("softmatch", ema_decay=0.5, n_sigma=2.0)  # uniform alignment on by default
  batch = {**semi_batch(), "unlabeled/labels": TRUTH}
  loss, m = run_term(obj.terms["unsup"].term, batch, ctx=ctx_for(obj))
  p, w = np_softmax(WEAK), UMASK
  pseudo = p.argmax(-1)  # unaligned
  aligned = np_align(p, np_wmean(p, w), np.full(3, 1 / 3))
  conf = aligned.max(-1)
  mu = 0.5 / 3 + 0.5 * np_wmean(conf, w)
  var = 0.5 + 0.5 * np.var(conf[:3], ddof=1)
  weights = np.exp(-np.minimum(conf - mu, 0) ** 2 / (2 * var / 4))
  np.testing.assert_allclose(loss, (np_ce(STRONG, pseudo) * weights * w).sum() / 3, rtol=1e-5)
  np.testing.assert_allclose([m["mu"], m["sigma"], m["mask_rate"]],
                             [mu, np.sqrt(var), (weights * w).sum() / 3], rtol=1e-5)
  right = (pseudo == TRUTH) * weights * w
  np.testing.assert_allclose(m["pseudo_label_accuracy"], right.sum() / (weights * w).sum(),
                             rtol=1e-5)
  new = state_of(m, "softmatch")
  np.testing.assert_allclose([new["mu"], new["var"]], [mu, var], rtol=1e-5)
  np.testing.assert_allclose(new["da_model"], np_wmean(p, w), rtol=1e-5)
  # Rows above mu weigh exactly 1.
  assert np.all(np.asarray(A.soft_weights(jnp.array([0.5, 0.9]), 0.5, 0.01, 2.0)) == 1.0)


def test_fixmatch_keeps_its_term_and_aligns_when_asked():
  plain = build("fixmatch", threshold=0.5)
  assert plain.init_extras is None and plain.wrap_step is None
  loss, m = run_term(plain.terms["unsup"].term, semi_batch())
  want, want_m = run_term(C.fixmatch_term(0.5), semi_batch())
  np.testing.assert_array_equal(loss, want)
  np.testing.assert_array_equal(m["mask_rate"], want_m["mask_rate"])

  obj = build("fixmatch", threshold=0.5, dist_align=True, dist_align_target="labels",
              dist_align_decay=0.5)
  loss, m = run_term(obj.terms["unsup"].term, semi_batch(), ctx=ctx_for(obj))
  p, w = np_softmax(WEAK), UMASK
  target = 0.5 / 3 + 0.5 * np.array([0.5, 0.0, 0.5])  # the labeled batch's labels are 0 and 2
  aligned = np_align(p, np_wmean(p, w), target)
  pseudo, mask = aligned.argmax(-1), (aligned.max(-1) >= 0.5).astype(np.float32)
  np.testing.assert_allclose(loss, (np_ce(STRONG, pseudo) * mask * w).sum() / 3, rtol=1e-5)
  np.testing.assert_allclose(state_of(m, "fixmatch")["da_target"], target, rtol=1e-6)


def test_bad_options_and_missing_state_fail_clearly():
  with pytest.raises(ValueError, match="pool_size"):
    build("flexmatch")
  with pytest.raises(ValueError, match="dist_align_target"):
    build("softmatch", dist_align_target="gt")
  with pytest.raises(ValueError, match="state_init"):
    build("freematch", state_init="zeros")
  with pytest.raises(ValueError, match="ema_decay"):
    build("softmatch", ema_decay=1.0)
  with pytest.raises(ValueError, match="n_sigma"):
    build("softmatch", n_sigma=0.0)
  with pytest.raises(ValueError, match="threshold"):
    build("flexmatch", threshold=1.5, pool_size=4)
  with pytest.raises(ValueError, match="classification"):
    registry.build(ml_collections.ConfigDict({"name": "freematch", "freematch": options(
        "freematch")}), types.SimpleNamespace(kind="regression", num_labels=1))
  with pytest.raises(ValueError, match="init_extras"):
    run_term(build("freematch").terms["unsup"].term, semi_batch())
  with pytest.raises(ValueError, match="unlabeled/strong"):
    obj = build("softmatch")
    run_term(obj.terms["unsup"].term, semi_batch(strong=False), ctx=ctx_for(obj))
  with pytest.raises(ValueError, match="found"):
    A.reported({"a/_state/x/k": 1, "b/_state/x/k": 2}, "x")


# --------------------------------------------------------------------------------- real steps


def make_state(objs, params, tx):
  trainable, frozen = split_params(params, lambda k: True)
  extras = {}
  for obj in objs:
    extras.update(obj.init_extras(trainable, frozen))
  return TrainState.create(trainable, frozen, tx, extras=extras)


SMALL = {"flexmatch": {"threshold": 0.5, "pool_size": 6}, "freematch": {"ema_decay": 0.5},
         "softmatch": {"ema_decay": 0.5, "dist_align_decay": 0.5},
         "fixmatch": {"threshold": 0.5, "dist_align": True, "dist_align_decay": 0.5}}



@pytest.mark.parametrize("name", list(SMALL))
def test_state_round_trips_through_the_extras(name):
  """After a step, extras[name] is what the term reported from the step's state; the next step's
  term reads it; the step's metrics stay scalars; a skipped (non-finite) step keeps the state. The
  state is donated, as in training (its initial leaves must not share buffers)."""
  obj = build(name, **SMALL[name])
  tx = optax.sgd(0.5)
  step = jax.jit(obj.wrap_step(make_step)(fixed_apply, obj.terms, tx,
                                          update_extras=obj.update_extras),
                 donate_argnums=0, compiler_options=FAST_COMPILE)
  term, rng = obj.terms["unsup"].term, jax.random.PRNGKey(0)

  def expected(s):  # the term on s's params and extras, outside the step
    host = jax.device_get(s)
    return run_term(term, semi_batch(), {"head": {"bias": host.trainable["head/bias"]}},
                    StepContext(host.step, host.extras))[1]

  s0 = make_state([obj], {"head": {"bias": jnp.zeros(3)}}, tx)
  before, init = expected(s0), jax.device_get(s0.extras[name])
  s1, m1 = step(s0, semi_batch(), rng)
  assert all(np.ndim(v) == 0 for v in m1.values()) and not any("_state" in k for k in m1)
  for k, v in state_of(before, name).items():
    np.testing.assert_allclose(s1.extras[name][k], v, rtol=1e-6, err_msg=k)
    assert s1.extras[name][k].dtype == jnp.float32
  assert not np.allclose(np.concatenate([np.ravel(v) for v in s1.extras[name].values()]),
                         np.concatenate([np.ravel(v) for v in init.values()]))
  after = expected(s1)
  s2, m2 = step(s1, semi_batch(), rng)
  np.testing.assert_allclose(m2["unsup/mask_rate"], after["mask_rate"], rtol=1e-6)
  for k, v in state_of(after, name).items():
    np.testing.assert_allclose(s2.extras[name][k], v, rtol=1e-5, err_msg=k)
  kept = jax.device_get(s2.extras[name])
  bad = {**semi_batch(), "fixed_logits": np.full((2, 3), np.nan, np.float32)}
  s3, m3 = step(s2, bad, rng)
  assert float(m3["nonfinite"]) == 1.0
  for k, v in kept.items():
    np.testing.assert_array_equal(s3.extras[name][k], v)


@pytest.mark.slow
def test_every_adaptive_term_steps_a_tiny_random_bert():
  """One jitted step of a tiny random BERT carrying every adaptive term (one compile for four),
  FixMatch aligned to the model's labeled predictions (its extra forward pass)."""
  from jaxft.models import init_random
  m = init_random({"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2,
                   "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 16,
                   "max_position_embeddings": 16, "type_vocab_size": 2},
                  head="sequence_classification", num_labels=3)
  settings = {**SMALL, "fixmatch": {**SMALL["fixmatch"], "threshold": 0.0,
                                    "dist_align_target": "model"},
              "flexmatch": {"threshold": 0.0, "pool_size": 16, "dist_align": True}}
  objs = {n: build(n, **o) for n, o in settings.items()}
  terms = {"sup": objs["freematch"].terms["sup"], **{n: o.terms["unsup"] for n, o in objs.items()}}
  tx = optax.sgd(0.1)
  state = make_state(objs.values(), m.params, tx)
  update = chain_update_extras(*[o.update_extras for o in objs.values()])
  step = jax.jit(A.without_state(make_step)(m.apply, terms, tx, update_extras=update),
                 compiler_options=FAST_COMPILE)
  new, metrics = step(state, token_batch(), jax.random.PRNGKey(0))
  assert float(metrics["nonfinite"]) == 0.0 and np.isfinite(float(metrics["loss"]))
  assert all(np.ndim(v) == 0 for v in metrics.values())
  for n in settings:
    assert float(metrics[f"loss/{n}"]) > 0.0, n
  assert float(metrics["flexmatch/mask_rate"]) == 1.0  # tau = 0: every row is confident
  flex = new.extras["flexmatch"]
  assert float(flex["visited"]) == 8.0 and float(flex["da_updates"]) == 1.0
  np.testing.assert_allclose(flex["memory"].sum(), 1.0, rtol=1e-6)
  np.testing.assert_allclose(flex["memory"][-1], 0.5, rtol=1e-6)  # 8 of 16 rows now confident
  assert not np.allclose(new.extras["fixmatch"]["da_target"], 1 / 3)  # moved by the labeled preds
