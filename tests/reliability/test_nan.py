"""NaN / Inf policy of the step and the loop, and the gradient-norm spike guard."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxft.models.outputs import ModelOutput
from jaxft.objectives.base import Weighted, make_step
from jaxft.objectives.supervised import classification_term
from jaxft.train.spike import COUNT, NORMS, SKIPPED, SpikeGuard, from_config
from jaxft.core.state import TrainState, flatten

from reliability_runs import assert_trees_bitwise_equal, load_config


def bag_apply(params, batch, *, rng=None, deterministic=True, **_):
  emb = params["emb"][batch["input_ids"]].mean(1)
  logits = emb @ params["head"]["kernel"]
  return ModelOutput(last_hidden_state=emb[:, None], embeddings=emb[:, None], logits=logits)


def poison_term(kind):
  """A loss term that is fine until batch["poison"] is set: then a NaN or Inf loss, or a finite
  loss with a NaN gradient (d/dx sqrt(x) at 0 times 0)."""

  def term(apply_fn, params, batch, rng, ctx):
    p = batch["poison"][0]
    w = params["head"]["kernel"][0, 0]
    if kind == "nan_loss":
      return jnp.where(p > 0, jnp.nan, 0.0) * w, {}
    if kind == "inf_loss":
      return jnp.where(p > 0, jnp.inf, 0.0) * w, {}
    return jnp.sqrt(jnp.where(p > 0, 0.0, 1.0) * w * w), {}  # NaN gradient, finite loss

  return term


def problem(kind, nan_policy):
  k = jax.random.split(jax.random.key(0), 3)
  params = {"emb": jax.random.normal(k[0], (20, 6)),
            "head": {"kernel": jax.random.normal(k[1], (6, 3))}}
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2))
  state = TrainState.create(flatten(params), {}, tx)
  step = jax.jit(make_step(bag_apply, {"ce": Weighted(classification_term()),
                                       "poison": Weighted(poison_term(kind))}, tx,
                           nan_policy=nan_policy))
  batch = {"input_ids": jax.random.randint(k[2], (8, 5), 0, 20), "labels": jnp.arange(8) % 3,
           "example_mask": jnp.ones(8), "poison": jnp.zeros(8)}
  return state, step, batch


@pytest.mark.parametrize("kind", ["nan_loss", "inf_loss", "nan_grad"])
def test_skip_policy_leaves_params_and_optimizer_bitwise_unchanged(kind):
  state, step, batch = problem(kind, "skip")
  state, m = step(state, batch, jax.random.key(1))
  assert float(m["nonfinite"]) == 0.0
  bad = dict(batch, poison=jnp.ones(8))
  for n in (1, 2):
    before = jax.device_get((state.trainable, state.opt_state))
    state, m = step(state, bad, jax.random.key(1))
    assert float(m["nonfinite"]) == 1.0
    assert int(state.extras["skipped_steps"]) == n and float(m["skipped_steps"]) == n
    assert_trees_bitwise_equal(before, jax.device_get((state.trainable, state.opt_state)))
  if kind == "nan_grad":
    assert np.isfinite(float(m["loss"]))  # only the gradient was poisoned
  # A good batch afterwards trains normally from where it was.
  state, m = step(state, batch, jax.random.key(1))
  assert float(m["nonfinite"]) == 0.0 and int(state.extras["skipped_steps"]) == 2
  assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree_util.tree_leaves(state.trainable))
  assert int(state.step) == 4


def test_none_policy_lets_the_nan_through():
  state, step, batch = problem("nan_loss", "none")
  state, _ = step(state, dict(batch, poison=jnp.ones(8)), jax.random.key(1))
  assert not np.isfinite(np.asarray(state.trainable["head/kernel"])).all()


@pytest.mark.slow
def test_error_policy_stops_the_loop_naming_the_step_range(tiny_model, tmp_path):
  """A learning rate of 1e30 overflows the weights after the first update; the loop raises at the
  first log step after the non-finite step, naming the range since the previous log step."""
  from jaxft.train import loop
  config = load_config(tiny_model, train__learning_rate=1e30, train__warmup_ratio=0.0,
                       train__nan_policy="error", train__log_every=4, train__num_steps=8)
  with pytest.raises(FloatingPointError, match=r"non-finite loss or gradients between steps 1 "
                     r"and 4 \(nan_policy=error\).*Lower train.learning_rate"):
    loop.train_and_evaluate(config, tmp_path / "run")


# ---------------------------------------------------------------- spike guard (jaxft.train.spike)

def run_guard(guard, norms):
  check = jax.jit(guard.check)
  extras, flags = guard.init(), []
  for n in norms:
    spike, update = check(extras, jnp.float32(n))
    extras = {**extras, **update}
    flags.append(bool(spike))
  return flags, extras


def test_spike_guard_flags_norms_far_above_the_recent_median():
  guard = SpikeGuard(factor=5.0, window=8, min_history=4)
  norms = [1.0, 1.2, 0.9, 50.0, 1.1, 1.0, 0.8, 6.0, 1.0, 30.0]
  flags, extras = run_guard(guard, norms)
  # 50 comes before min_history norms are known: not flagged; 6.0 > 5 x median(1.0) is.
  assert flags == [False, False, False, False, False, False, False, True, False, True]
  assert int(extras[SKIPPED]) == 2 and int(extras[COUNT]) == len(norms)
  # The window is a ring buffer of the last 8 norms, spikes included.
  np.testing.assert_array_equal(np.asarray(extras[NORMS]),
                                np.float32([1.0, 30.0, 0.9, 50.0, 1.1, 1.0, 0.8, 6.0]))


def test_spike_guard_ignores_nonfinite_norms_and_adopts_a_lasting_new_scale():
  guard = SpikeGuard(factor=4.0, window=6, min_history=3)
  flags, extras = run_guard(guard, [1.0, 1.0, 1.0, float("nan"), float("inf")])
  assert flags == [False] * 5  # non-finite norms are the NaN guard's job, and stay out
  assert int(extras[COUNT]) == 3
  # Gradients 10x larger from now on: skipped at first, normal once they fill half the window.
  flags, _ = run_guard(guard, [1.0] * 6 + [10.0] * 6)
  assert flags[6:] == [True, True, True, False, False, False]


def test_spike_guard_state_is_checkpointable_and_config_driven():
  from jaxft.config import base_config
  guard = SpikeGuard(factor=10.0, window=5, min_history=2)
  assert {k: (v.shape, v.dtype) for k, v in guard.init().items()} == {
      NORMS: ((5,), jnp.float32), COUNT: ((), jnp.int32), SKIPPED: ((), jnp.int32)}
  assert from_config(base_config().train) is None  # off unless train.spike_factor > 0
  with pytest.raises(ValueError, match="factor must be > 1"):
    SpikeGuard(factor=0.5)
  with pytest.raises(ValueError, match="min_history <= window"):
    SpikeGuard(factor=10.0, window=4, min_history=5)
