"""int8 PTQ: round-trip error bound, exact int8 values, size report; QAT equals PTQ forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft import quant
from jaxft.quant.int8 import QMAX


def test_quantize_hand_example():
  # Kernel [in=2, out=3]; channel c scale = max|w[:, c]| / 127.
  w = jnp.array([[1.0, -0.5, 0.0], [-2.54, 0.25, 0.0]], jnp.float32)
  qt = quant.quantize(w, channel_axis=-1)
  np.testing.assert_allclose(qt.scale, [[2.54 / 127, 0.5 / 127, 0.0]], rtol=1e-6)
  assert qt.q.dtype == jnp.int8 and qt.scale.dtype == jnp.float32
  # 1.0 / 0.02 = 50; -2.54 -> -127; -0.5 -> -127; 0.25 -> 63.5 -> 64 (round half to even: 64).
  np.testing.assert_array_equal(qt.q, [[50, -127, 0], [-127, 64, 0]])
  np.testing.assert_array_equal(qt.dequantize()[:, 2], [0.0, 0.0])  # an all-zero channel


def test_round_trip_error_bounded_by_half_scale():
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(0, 0.05, (64, 48)) * rng.uniform(0.1, 10, (1, 48)), jnp.float32)
  for axis in (-1, 0):
    qt = quant.quantize(w, channel_axis=axis)
    err = np.abs(np.asarray(w) - np.asarray(qt.dequantize()))
    bound = np.broadcast_to(np.asarray(qt.scale) / 2, w.shape)
    # Real arithmetic gives err <= scale/2; allow the float32 rounding of w / scale and q * scale.
    assert np.all(err <= bound * (1 + 1e-5) + 1e-12), (axis, float((err - bound).max()))
    assert np.abs(np.asarray(qt.q)).max() == QMAX  # the largest weight of a channel maps to +-127
    # Per channel along `axis`: one scale per output channel.
    assert qt.scale.shape == ((1, 48) if axis == -1 else (64, 1))


def test_quantize_params_selects_kernels_and_size_report():
  flat = {"encoder/layer_0/query/kernel": jnp.ones((8, 4)),
          "encoder/layer_0/query/bias": jnp.ones((4,)),
          "embeddings/word_embeddings/embedding": jnp.ones((10, 8)),
          "encoder/layer_0/LayerNorm/scale": jnp.ones((8,))}
  q = quant.quantize_params(flat)
  assert isinstance(q["encoder/layer_0/query/kernel"], quant.QTensor)
  assert not isinstance(q["embeddings/word_embeddings/embedding"], quant.QTensor)
  rep = quant.size_report(flat, q)
  fp32 = 4 * (32 + 4 + 80 + 8)
  int8 = 32 + 4 * 4 + 4 * (4 + 80 + 8)  # int8 kernel + 4 float scales + float rest
  assert rep["fp32_bytes"] == fp32 and rep["int8_bytes"] == int8
  assert rep["quantized_params"] == 32 and rep["quantized_leaves"] == 1
  q2 = quant.quantize_params(flat, quant.QuantSpec(embeddings=r"word_embeddings"))
  assert q2["embeddings/word_embeddings/embedding"].scale.shape == (10, 1)  # per token row
  with pytest.raises(ValueError, match="selected no parameter"):
    quant.quantize_params(flat, quant.QuantSpec(kernels="nomatch"))
  with pytest.raises(TypeError, match="flat"):
    quant.quantize_params({"a": {"kernel": jnp.ones((2, 2))}})


def test_fake_quant_equals_dequantized_and_passes_gradient_straight_through():
  w = jax.random.normal(jax.random.PRNGKey(1), (16, 12)) * 0.1
  fq = quant.fake_quant(w)
  np.testing.assert_array_equal(fq, quant.quantize(w).dequantize())
  np.testing.assert_array_equal(jax.jit(quant.fake_quant)(w), fq)
  g = jax.grad(lambda x: jnp.sum(quant.fake_quant(x) * jnp.arange(12.0)))(w)
  np.testing.assert_array_equal(g, jnp.broadcast_to(jnp.arange(12.0), w.shape))


# ------------------------------------------------------------------ on a tiny random BERT
import optax  # noqa: E402

from jaxft.models import init_random  # noqa: E402
from jaxft.objectives.base import Weighted, make_step  # noqa: E402
from jaxft.objectives.supervised import classification_term  # noqa: E402
from jaxft.core.state import TrainState, flatten, unflatten  # noqa: E402


@pytest.fixture(scope="module")
def bert():
  cfg = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2,
         "num_attention_heads": 4, "intermediate_size": 64, "vocab_size": 50,
         "max_position_embeddings": 32, "type_vocab_size": 2}
  m = init_random(cfg, head="sequence_classification", num_labels=3, seed=0,
                  hidden_dropout=0.0, attention_dropout=0.0)
  # Spread the weights so quantization error is visible and the head is not near zero.
  flat = {k: v * (20.0 if k.startswith("head/") else 1.0) for k, v in flatten(m.params).items()}
  return m.with_params(unflatten(flat))


def batch(seed=0):
  rng = np.random.default_rng(seed)
  return {"input_ids": jnp.asarray(rng.integers(1, 50, (4, 8)), jnp.int32),
          "attention_mask": jnp.ones((4, 8), jnp.int32),
          "labels": jnp.asarray(rng.integers(0, 3, 4), jnp.int32)}


def test_ptq_model_close_to_fp32_and_qat_forward_equals_ptq_forward(bert):
  q = quant.quantize_tree(bert.params)
  assert sum(isinstance(v, quant.QTensor) for v in q.values()) == 14  # 12 encoder, pooler, head
  b = batch()
  ptq = jax.jit(quant.quantized_apply(bert.apply))(q, b).logits
  fp32 = jax.jit(bert.apply)(bert.params, b).logits
  qat = jax.jit(quant.qat_apply(bert.apply))(bert.params, b).logits
  np.testing.assert_array_equal(qat, ptq)  # same weights, bit for bit
  rel = float(jnp.max(jnp.abs(ptq - fp32)) / jnp.max(jnp.abs(fp32)))
  assert 0 < rel < 0.02, rel
  rep = quant.size_report(flatten(bert.params), q)
  kernels = sum(v.q.size for v in q.values() if isinstance(v, quant.QTensor))
  scales = sum(v.scale.size for v in q.values() if isinstance(v, quant.QTensor))
  assert rep["fp32_bytes"] - rep["int8_bytes"] == 3 * kernels - 4 * scales
  assert rep["ratio"] > 1.5


def test_qat_step_trains_float_weights_through_fake_quant(bert):
  tx = optax.adam(1e-2)
  state = TrainState.create(flatten(bert.params), {}, tx)
  step = jax.jit(make_step(bert.apply, {"sup": Weighted(quant.qat_term(classification_term()))},
                           tx))
  losses = []
  for t in range(8):
    state, m = step(state, batch(), jax.random.key(t))
    losses.append(float(m["loss"]))
  assert losses[-1] < 0.5 * losses[0], losses
  # Rounding has zero derivative: only the straight-through gradient can have moved the floats.
  k = "backbone/encoder/layer_0/attention/self/query/kernel"
  assert not np.array_equal(state.trainable[k], flatten(bert.params)[k])
