"""R-Drop: the loss against a hand computation, and real steps of a tiny random BERT configured the
way a user would (--config.objective.name=rdrop --config.objective.rdrop.alpha=...)."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxft import config as jconfig
from jaxft.models import init_random
from jaxft.models.outputs import ModelOutput
from jaxft.objectives import rdrop, registry
from jaxft.objectives.base import StepContext, make_step
from jaxft.core.state import TrainState, split_params

CTX = StepContext(step=jnp.zeros((), jnp.int32), extras={})
# Tiny test graphs: XLA's slow optimisation passes would cost more than they save.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_symmetric_kl_matches_numpy():
  a = np.array([[1.0, 0.0, -2.0], [0.3, 0.3, 0.3]], np.float32)
  b = np.array([[0.0, 2.0, 0.0], [0.3, 0.3, 0.3]], np.float32)
  la, lb = np_log_softmax(a), np_log_softmax(b)
  want = 0.5 * (np.sum(np.exp(la) * (la - lb), -1) + np.sum(np.exp(lb) * (lb - la), -1))
  np.testing.assert_allclose(rdrop.symmetric_kl(a, b), want, rtol=1e-6)
  np.testing.assert_allclose(rdrop.symmetric_kl(b, a), want, rtol=1e-6)
  assert float(rdrop.symmetric_kl(a, b)[1]) == 0.0


def two_pass_apply(params, batch, *, rng=None, deterministic=True, **_):
  """Stands in for two dropout draws: the second copy of the stacked batch gets shifted logits."""
  logits = jnp.asarray(batch["fixed_logits"])
  half = logits.shape[0] // 2
  second = (jnp.arange(logits.shape[0]) >= half).reshape((-1,) + (1,) * (logits.ndim - 1))
  logits = logits + second * params["shift"]
  return ModelOutput(last_hidden_state=logits, embeddings=logits, logits=logits)


def test_rdrop_term_equals_eq3_by_hand_for_sequences_and_tokens():
  alpha, shift = 2.5, np.array([0.5, -1.0, 0.0], np.float32)
  z = np.array([[2.0, 0.0, 1.0], [0.0, 1.0, 0.0], [9.0, 9.0, 9.0]], np.float32)
  y = np.array([0, 2, 1])
  batch = {"fixed_logits": z, "labels": y, "example_mask": np.array([1, 1, 0], np.float32)}
  loss, m = rdrop.rdrop_term(alpha)(two_pass_apply, {"shift": shift}, batch, None, CTX)
  l1, l2 = np_log_softmax(z), np_log_softmax(z + shift)
  ce = -l1[np.arange(3), y] - l2[np.arange(3), y]
  kl = 0.5 * np.sum((np.exp(l1) - np.exp(l2)) * (l1 - l2), -1)
  np.testing.assert_allclose(loss, (ce + alpha * kl)[:2].mean(), rtol=1e-6)
  np.testing.assert_allclose([m["ce"], m["kl"]], [ce[:2].mean() / 2, kl[:2].mean()], rtol=1e-6)
  # Token classification: [B, S, C] logits, -100 labels ignored.
  zt = np.stack([z, z[::-1]])
  yt = np.array([[0, -100, 1], [2, 2, -100]])
  loss_t, _ = rdrop.rdrop_term(alpha)(two_pass_apply, {"shift": shift},
                                      {"fixed_logits": zt, "labels": yt}, None, CTX)
  l1, l2 = np_log_softmax(zt), np_log_softmax(zt + shift)
  valid = yt != -100
  idx = np.where(valid, yt, 0)
  pick = lambda logp: np.take_along_axis(logp, idx[..., None], -1)[..., 0]  # noqa: E731
  ce = -pick(l1) - pick(l2)
  kl = 0.5 * np.sum((np.exp(l1) - np.exp(l2)) * (l1 - l2), -1)
  np.testing.assert_allclose(loss_t, (ce + alpha * kl)[valid].mean(), rtol=1e-6)


def tiny_bert(dropout):
  return init_random({"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2,
                      "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 30,
                      "max_position_embeddings": 16, "type_vocab_size": 2},
                     head="sequence_classification", num_labels=2, hidden_dropout=dropout,
                     attention_dropout=dropout, classifier_dropout=dropout)


def text_batch():
  r = np.random.default_rng(0)
  ids = r.integers(3, 30, (8, 8)).astype(np.int32)
  ids[:, 0], ids[:, -1] = 1, 2
  return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids),
          "labels": (ids[:, 1] % 2).astype(np.int32), "example_mask": np.ones(8, np.float32)}


def test_rdrop_configured_by_overrides_trains_a_tiny_bert():
  cfg = jconfig.base_config()
  jconfig.apply_override(cfg, "objective.name", "rdrop")
  jconfig.apply_override(cfg, "objective.rdrop.alpha", "4")
  assert cfg.objective.rdrop.alpha == 4.0
  obj = registry.build(cfg.objective, types.SimpleNamespace(kind="classification", num_labels=2))
  model = tiny_bert(0.1)
  tx = optax.adam(3e-3)
  trainable, frozen = split_params(model.params, lambda k: True)
  state = TrainState.create(trainable, frozen, tx)
  step = jax.jit(make_step(model.apply, obj.terms, tx), compiler_options=FAST_COMPILE)
  batch, losses = text_batch(), []
  for i in range(8):
    state, m = step(state, batch, jax.random.PRNGKey(i))
    losses.append(float(m["loss"]))
    assert float(m["rdrop/kl"]) > 0.0  # two dropout masks, two different predictions
    np.testing.assert_allclose(m["loss"], 2 * m["rdrop/ce"] + 4.0 * m["rdrop/kl"], rtol=1e-5)
  assert int(state.step) == 8 and losses[-1] < losses[0]
  # Without dropout the two passes agree exactly: KL 0 and L = 2 CE.
  still = tiny_bert(0.0)
  loss, m = jax.jit(lambda p, b, r: rdrop.rdrop_term(4.0)(still.apply, p, b, r, CTX),
                    compiler_options=FAST_COMPILE)(
      still.params, batch, jax.random.PRNGKey(0))
  assert float(m["kl"]) < 1e-9
  np.testing.assert_allclose(loss, 2 * m["ce"], rtol=1e-6)


def test_rdrop_rejects_regression_and_negative_alpha():
  cfg = jconfig.base_config()
  cfg.objective.name = "rdrop"
  with pytest.raises(ValueError, match="classification"):
    registry.build(cfg.objective, types.SimpleNamespace(kind="regression"))
  cfg.objective.rdrop.alpha = -1.0
  with pytest.raises(ValueError, match="alpha"):
    registry.build(cfg.objective, types.SimpleNamespace(kind="classification"))
