"""Supervised contrastive fine-tuning: Gunel et al.'s L_SCL and SetFit's pair loss against loops
written from the papers' equations, and real steps of a tiny BERT with mean pooling."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxft import config as jconfig
from jaxft.core.state import TrainState, split_params
from jaxft.models import init_random
from jaxft.models.outputs import ModelOutput
from jaxft.objectives import contrastive, registry
from jaxft.objectives.base import StepContext, make_step

CTX = StepContext(step=jnp.zeros((), jnp.int32), extras={})
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

E = np.array([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.0, 1.0, 0.0], [0.0, 0.6, 0.8],
              [3.0, 3.0, 3.0]], np.float32)
Y = np.array([0, 0, 1, 1, 1])
W = np.array([1, 1, 1, 1, 0], np.float32)  # the last row only pads the batch


def unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_supcon_equals_gunel_eq2_by_loops():
  tau, z, real = 0.3, unit(E), [0, 1, 2, 3]
  per_anchor = []
  for i in real:
    positives = [j for j in real if j != i and Y[j] == Y[i]]
    denom = sum(np.exp(z[i] @ z[k] / tau) for k in real if k != i)
    per_anchor.append(-np.mean([np.log(np.exp(z[i] @ z[j] / tau) / denom) for j in positives]))
  got = contrastive.supcon_loss(E, Y, W, tau)
  np.testing.assert_allclose(got, np.mean(per_anchor), rtol=1e-6)
  # An anchor with no positive in the batch is left out of the mean.
  y2 = np.array([0, 1, 1, 1, 1])
  per = []
  for i in (1, 2, 3):
    denom = sum(np.exp(z[i] @ z[k] / tau) for k in real if k != i)
    per.append(-np.mean([np.log(np.exp(z[i] @ z[j] / tau) / denom)
                         for j in (1, 2, 3) if j != i]))
  np.testing.assert_allclose(contrastive.supcon_loss(E, y2, W, tau), np.mean(per), rtol=1e-6)


def test_cosine_pair_loss_equals_setfit_by_loops():
  z = unit(E)
  sq = [(z[i] @ z[j] - float(Y[i] == Y[j])) ** 2 for i in range(4) for j in range(i + 1, 4)]
  np.testing.assert_allclose(contrastive.cosine_pair_loss(E, Y, W), np.mean(sq), rtol=1e-6)


def test_term_mixes_ce_and_contrastive_with_lambda():
  logits = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 3.0], [5.0, 5.0]], np.float32)

  def apply(params, batch, rng=None, deterministic=True, **_):
    return ModelOutput(last_hidden_state=None, embeddings=None, logits=jnp.asarray(logits),
                       pooled=jnp.asarray(E))

  batch = {"labels": Y, "example_mask": W}
  loss, m = contrastive.contrastive_term(0.9, 0.3, "supcon")(apply, {}, batch, None, CTX)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  ce = -np.mean(logp[np.arange(4), Y[:4]])
  np.testing.assert_allclose(m["ce"], ce, rtol=1e-6)
  np.testing.assert_allclose(loss, 0.1 * ce + 0.9 * contrastive.supcon_loss(E, Y, W, 0.3),
                             rtol=1e-6)
  assert float(m["accuracy"]) == 0.5  # rows 0 and 3 right; row 1 says 1, row 2 ties -> 0


def tiny_bert():
  return init_random({"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2,
                      "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 30,
                      "max_position_embeddings": 16, "type_vocab_size": 2},
                     head="sequence_classification", num_labels=2, pooling="mean")


def test_contrastive_trains_a_tiny_bert_and_separates_the_classes():
  cfg = jconfig.base_config()
  jconfig.apply_override(cfg, "objective.name", "contrastive")
  jconfig.apply_override(cfg, "objective.contrastive.loss", "cosine")
  obj = registry.build(cfg.objective, types.SimpleNamespace(kind="classification", num_labels=2))
  model = tiny_bert()
  r = np.random.default_rng(0)
  ids = r.integers(3, 30, (8, 8)).astype(np.int32)
  batch = {"input_ids": ids, "attention_mask": np.ones_like(ids),
           "token_type_ids": np.zeros_like(ids), "labels": (ids[:, 1] % 2).astype(np.int32),
           "example_mask": np.ones(8, np.float32)}
  tx = optax.adam(3e-3)
  state = TrainState.create(*split_params(model.params, lambda k: True), tx)
  step = jax.jit(make_step(model.apply, obj.terms, tx), compiler_options=FAST_COMPILE)
  seen = []
  for i in range(10):
    state, m = step(state, batch, jax.random.PRNGKey(i))
    seen.append(float(m["contrastive/contrastive"]))
  assert int(state.step) == 10 and seen[-1] < 0.5 * seen[0]


def test_contrastive_rejects_bad_options():
  cfg = jconfig.base_config()
  cfg.objective.name = "contrastive"
  info = types.SimpleNamespace(kind="classification", num_labels=2)
  with pytest.raises(ValueError, match="classification"):
    registry.build(cfg.objective, types.SimpleNamespace(kind="regression"))
  for key, value, match in (("loss", "triplet", "loss"), ("weight", 1.5, "weight"),
                            ("temperature", 0.0, "temperature")):
    cfg2 = jconfig.base_config()
    cfg2.objective.name = "contrastive"
    cfg2.objective.contrastive[key] = value
    with pytest.raises(ValueError, match=match):
      registry.build(cfg2.objective, info)
