"""The generic step: gradient accumulation, NaN guard, frozen leaves, metrics, optimizer rules."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxft.config import base_config
from jaxft.models.outputs import ModelOutput
from jaxft.objectives.base import Weighted, make_step
from jaxft.objectives.supervised import classification_term
from jaxft.train import optim
from jaxft.core.state import TrainState, flatten


def linear_apply(params, batch, *, rng=None, deterministic=True, **_):
  """A bag-of-embeddings classifier: enough structure for the step's bookkeeping."""
  emb = params["backbone"]["embeddings"]["word"][batch["input_ids"]]
  pooled = emb.mean(1)
  logits = pooled @ params["head"]["kernel"] + params["head"]["bias"]
  return ModelOutput(last_hidden_state=emb, embeddings=emb, logits=logits)


def make_problem(seed=0, batch=8):
  k = jax.random.split(jax.random.key(seed), 3)
  params = {"backbone": {"embeddings": {"word": jax.random.normal(k[0], (20, 6))}},
            "head": {"kernel": jax.random.normal(k[1], (6, 3)) * 0.1, "bias": jnp.zeros(3)}}
  data = {"input_ids": jax.random.randint(k[2], (batch, 5), 0, 20).astype(jnp.int32),
          "labels": jnp.arange(batch, dtype=jnp.int32) % 3,
          "example_mask": jnp.ones(batch, jnp.float32)}
  return params, data


def build(params, trainable_pred, accum=1, nan_policy="skip", lr=0.1):
  flat = flatten(params)
  trainable = {k: v for k, v in flat.items() if trainable_pred(k)}
  frozen = {k: v for k, v in flat.items() if not trainable_pred(k)}
  tx = optax.adamw(lr, weight_decay=0.01)
  state = TrainState.create(trainable, frozen, tx)
  step = make_step(linear_apply, {"sup": Weighted(classification_term())}, tx,
                   grad_accum_steps=accum, nan_policy=nan_policy)
  return state, jax.jit(step)


def test_loss_falls_and_frozen_leaves_stay_bitwise():
  params, batch = make_problem()
  state, step = build(params, lambda k: k.startswith("head/"))
  frozen_before = jax.device_get(state.frozen)
  losses = []
  for _ in range(20):
    state, m = step(state, batch, jax.random.key(1))
    losses.append(float(m["loss"]))
  assert losses[-1] < 0.7 * losses[0]
  for k, v in frozen_before.items():
    np.testing.assert_array_equal(np.asarray(state.frozen[k]), v)
  # Optimizer moments exist for trainable leaves only.
  mu = state.opt_state[0].mu
  assert set(mu) == {"head/kernel", "head/bias"}
  for name in ("loss", "loss/sup", "sup/accuracy", "grad_norm", "lr", "nonfinite", "skipped_steps"):
    assert m[name].shape == ()
  assert "param_norm" not in m and "update_norm" not in m  # log steps compute param_norm


def test_log_norms_reports_param_and_update_norms():
  params, batch = make_problem()
  flat = flatten(params)
  tx = optax.sgd(0.1)
  state = TrainState.create(flat, {}, tx)
  step = jax.jit(make_step(linear_apply, {"sup": Weighted(classification_term())}, tx,
                           log_norms=True))
  new, m = step(state, batch, jax.random.key(0))
  np.testing.assert_allclose(m["param_norm"], optax.tree.norm(new.trainable), rtol=1e-6)
  delta = jax.tree_util.tree_map(jnp.subtract, new.trainable, state.trainable)
  np.testing.assert_allclose(m["update_norm"], optax.tree.norm(delta), rtol=1e-5)
  # sgd(0.1): the update is -0.1 x the gradient.
  np.testing.assert_allclose(m["update_norm"], 0.1 * m["grad_norm"], rtol=1e-5)


def test_clipping_in_the_step_matches_the_optax_chain_bitwise():
  params, batch = make_problem()
  flat = flatten(params)
  scaled = {**flat, "head/kernel": flat["head/kernel"] * 50.0}  # a norm well above the clip
  term = {"sup": Weighted(classification_term())}
  chain = optax.chain(optax.clip_by_global_norm(0.5), optax.adamw(0.1, weight_decay=0.01))
  plain = optax.adamw(0.1, weight_decay=0.01)
  a = TrainState.create(scaled, {}, chain)
  b = TrainState.create(scaled, {}, plain)
  step_a = jax.jit(make_step(linear_apply, term, chain))
  step_b = jax.jit(make_step(linear_apply, term, plain, grad_clip=0.5))
  for _ in range(3):
    a, ma = step_a(a, batch, jax.random.key(0))
    b, mb = step_b(b, batch, jax.random.key(0))
    assert float(mb["grad_norm"]) > 0.5
  for k in a.trainable:
    np.testing.assert_array_equal(np.asarray(a.trainable[k]), np.asarray(b.trainable[k]))


def test_grad_accumulation_matches_full_batch():
  params, batch = make_problem(batch=8)
  s1, step1 = build(params, lambda k: True, accum=1)
  s4, step4 = build(params, lambda k: True, accum=4)
  for _ in range(3):
    s1, m1 = step1(s1, batch, jax.random.key(0))
    s4, m4 = step4(s4, batch, jax.random.key(0))
  for k in s1.trainable:
    np.testing.assert_allclose(s1.trainable[k], s4.trainable[k], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-5)


def test_nonfinite_step_is_skipped_bitwise():
  params, batch = make_problem()
  state, step = build(params, lambda k: True)
  state, _ = step(state, batch, jax.random.key(0))
  before = jax.device_get((state.trainable, state.opt_state))
  bad = dict(batch, example_mask=batch["example_mask"].at[0].set(jnp.nan))
  state, m = step(state, bad, jax.random.key(0))
  assert float(m["nonfinite"]) == 1.0 and int(state.extras["skipped_steps"]) == 1
  after = jax.device_get((state.trainable, state.opt_state))
  jax.tree_util.tree_map(np.testing.assert_array_equal, before, after)
  assert int(state.step) == 2  # the step counter still advances: batch s is consumed once


def test_padding_rows_do_not_change_the_loss():
  params, batch = make_problem(batch=8)
  state, step = build(params, lambda k: True)
  padded = {k: jnp.concatenate([v, v[:2]]) for k, v in batch.items()}
  padded["example_mask"] = padded["example_mask"].at[8:].set(0.0)
  _, m_full = step(state, batch, jax.random.key(0))
  state2, _ = build(params, lambda k: True)
  _, m_pad = step(state2, padded, jax.random.key(0))
  np.testing.assert_allclose(m_full["loss"], m_pad["loss"], rtol=1e-6)


def test_weight_decay_mask_and_layer_depths():
  assert optim.decays("backbone/encoder/layer_0/attention/query/kernel")
  assert not optim.decays("backbone/encoder/layer_0/attention/query/bias")
  assert not optim.decays("backbone/encoder/layer_0/output/LayerNorm/scale")
  assert not optim.decays("backbone/embeddings/LayerNorm/bias")
  assert optim.layer_depth("backbone/embeddings/word_embeddings/embedding", 6) == 0
  assert optim.layer_depth("backbone/encoder/layer_3/output/dense/kernel", 6) == 4
  assert optim.layer_depth("head/classifier/kernel", 6) == 7


def test_schedule_warmup_and_decay():
  t = base_config().train
  t.learning_rate, t.warmup_ratio, t.schedule = 1.0, 0.1, "linear"
  s = optim.make_schedule(t, 100)
  assert float(s(0)) == 0.0 and float(s(10)) == pytest.approx(1.0)
  assert float(s(55)) == pytest.approx(0.5, abs=1e-6) and float(s(100)) == pytest.approx(0.0)
  t.schedule = "cosine"
  assert float(optim.make_schedule(t, 100)(55)) == pytest.approx(0.5, abs=1e-6)
  t.schedule = "bogus"
  with pytest.raises(ValueError, match="unknown train.schedule"):
    optim.make_schedule(t, 100)


def test_layer_decay_multipliers():
  t = base_config().train
  t.layer_decay = 0.5
  trainable = {"backbone/embeddings/word_embeddings/embedding": 0,
               "backbone/encoder/layer_1/output/dense/kernel": 0, "head/classifier/kernel": 0}
  m = optim.lr_multipliers(trainable, t, num_layers=2)
  assert m == {"backbone/embeddings/word_embeddings/embedding": 0.125,
               "backbone/encoder/layer_1/output/dense/kernel": 0.5, "head/classifier/kernel": 1.0}


def test_spike_guard_skips_an_update_far_above_the_recent_norms():
  from jaxft.train.spike import SpikeGuard
  params, batch = make_problem()
  flat = flatten(params)
  tx = optax.sgd(0.01)
  guard = SpikeGuard(factor=10.0, window=8, min_history=4)
  state = TrainState.create(flat, {}, tx, guard.init())
  step = jax.jit(make_step(linear_apply, {"sup": Weighted(classification_term())}, tx,
                           spike_guard=guard))
  for _ in range(5):
    state, m = step(state, batch, jax.random.key(0))
    assert float(m["spike"]) == 0.0
  before = jax.device_get((state.trainable, state.opt_state))
  # Embeddings x 1000: logits and gradients explode, finite but far above the recent median.
  big = jax.tree_util.tree_map(lambda x: x, state)
  big = big.replace(trainable={**state.trainable,
                               "head/kernel": state.trainable["head/kernel"] * 1000.0})
  before = jax.device_get((big.trainable, big.opt_state))
  after, m = step(big, batch, jax.random.key(0))
  assert float(m["spike"]) == 1.0 and float(m["spike_skipped"]) == 1.0
  assert float(m["skipped_steps"]) == 0.0  # not a NaN skip: nan_policy=error would not stop
  for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(after.trainable)
                  + jax.tree_util.tree_leaves(after.opt_state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(after.step) == 6 and int(after.extras["spike/count"]) == 6


def test_guarded_adamw_matches_optax_and_a_skip_keeps_everything_bitwise():
  """The builder's optimizer takes the skip decision inside AdamW (no copies of the moments): the
  same numbers as optax.adamw on applied steps; the old params and state on skipped ones."""
  params, batch = make_problem()
  flat = flatten(params)
  term = {"sup": Weighted(classification_term())}
  schedule = optax.linear_schedule(0.1, 0.0, 10)
  mask = {k: k.endswith("kernel") for k in flat}
  plain = optax.adamw(schedule, weight_decay=0.01, mask=mask)
  guarded = optim.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, mask=mask,
                        guarded=True)
  a = TrainState.create(flat, {}, plain)
  b = TrainState.create(flat, {}, guarded)
  assert jax.tree_util.tree_structure(a.opt_state) == jax.tree_util.tree_structure(b.opt_state)
  step_a = jax.jit(make_step(linear_apply, term, plain, grad_clip=1.0))
  step_b = jax.jit(make_step(linear_apply, term, guarded, grad_clip=1.0, guard_in_optimizer=True))
  for _ in range(3):
    a, _ = step_a(a, batch, jax.random.key(0))
    b, _ = step_b(b, batch, jax.random.key(0))
  for x, y in zip(jax.tree_util.tree_leaves((a.trainable, a.opt_state)),
                  jax.tree_util.tree_leaves((b.trainable, b.opt_state))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # A NaN parameter makes the loss and gradients NaN: the step is skipped.
  b_nan = b.replace(trainable={**b.trainable, "head/bias": b.trainable["head/bias"] * jnp.nan})
  before = jax.device_get((b_nan.trainable, b_nan.opt_state))
  after, m = step_b(b_nan, batch, jax.random.key(0))
  assert float(m["nonfinite"]) == 1.0 and float(m["skipped_steps"]) == 1.0
  for x, y in zip(jax.tree_util.tree_leaves(before),
                  jax.tree_util.tree_leaves((after.trainable, after.opt_state))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert int(after.step) == 4
