"""Forward options: embedding perturbation, dropout, remat, bf16, attention paths, pooling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft.models import from_pretrained, init_random
from jaxft.models import layers as L

import hf_tiny as tiny


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  return tiny.saved_bert_classifier(tmp_path_factory)


_logits = tiny.logits


def test_embedding_perturbation(ckpt):
  m = from_pretrained(ckpt[0], head="sequence_classification")
  b = tiny.batch("bert")
  f = jax.jit(lambda d: m.apply(m.params, b, embedding_perturbation=d))
  out = jax.jit(lambda: m.apply(m.params, b))()
  zero = f(jnp.zeros_like(out.embeddings))
  np.testing.assert_array_equal(np.asarray(zero.logits), np.asarray(out.logits))
  delta = 0.1 * jax.random.normal(jax.random.PRNGKey(0), out.embeddings.shape)
  moved = f(delta)
  assert np.abs(np.asarray(moved.logits - out.logits)).max() > 1e-3
  # Adversarial objectives differentiate through it: a nonzero gradient w.r.t. the perturbation.
  g = jax.jit(jax.grad(lambda d: f(d).logits.sum()))(delta)
  assert float(jnp.abs(g).max()) > 0


def test_dropout_needs_rng_and_is_reproducible(ckpt):
  m = from_pretrained(ckpt[0], head="sequence_classification")
  b = tiny.batch("bert")
  with pytest.raises(ValueError, match="rng"):
    m.apply(m.params, b, deterministic=False)
  f = jax.jit(lambda p, r: m.apply(p, b, rng=r, deterministic=False).logits)
  a, a2, c = (np.asarray(f(m.params, jax.random.PRNGKey(k))) for k in (1, 1, 2))
  np.testing.assert_array_equal(a, a2)
  assert np.abs(a - c).max() > 1e-4 and np.abs(a - _logits(m, b)).max() > 1e-4


def test_remat_same_values_and_gradients(ckpt):
  b = tiny.batch("bert")
  plain = from_pretrained(ckpt[0], head="sequence_classification")
  remat = from_pretrained(ckpt[0], head="sequence_classification", remat=True,
                          remat_policy="dots_saveable")
  loss = lambda m: jax.jit(jax.grad(lambda p: m.apply(p, b).logits.sum()))(m.params)
  np.testing.assert_allclose(_logits(remat, b), _logits(plain, b), atol=1e-6, rtol=0)
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5, rtol=0),
                         loss(remat), loss(plain))
  with pytest.raises(ValueError, match="remat_policy"):
    init_random(tiny.hf_config("bert"), remat=True, remat_policy="no_such_policy")


def test_bf16_compute_keeps_fp32_master_params(ckpt):
  b = tiny.batch("bert")
  plain = from_pretrained(ckpt[0], head="sequence_classification")
  half = from_pretrained(ckpt[0], head="sequence_classification", dtype="bfloat16")
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(half.params))
  out = jax.jit(half.apply)(half.params, b)
  assert out.last_hidden_state.dtype == jnp.bfloat16 and out.logits.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out.logits), _logits(plain, b), atol=5e-2, rtol=0)


def test_attention_paths_agree():
  rs = np.random.RandomState(0)
  q, k, v = (jnp.asarray(rs.randn(2, 7, 3, 8), jnp.float32) for _ in range(3))
  mask = jnp.asarray([[1] * 7, [1] * 4 + [0] * 3], bool)
  bias = jnp.asarray(rs.randn(1, 3, 7, 7), jnp.float32)
  ref, probs = L.explicit_attention(q, k, v, mask, bias, lambda x, deterministic: x, True)
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-6)
  assert float(probs[1, :, :, 4:].max()) == 0.0
  xla = L.fused_attention(q, k, v, mask, bias, "xla")
  # The cuDNN path's right-padding -> key_value_seq_lengths translation, run on XLA here.
  lengths = L.fused_attention(q, k, v, mask, bias, "cudnn", backend="xla")
  np.testing.assert_allclose(xla, ref, atol=1e-6)
  np.testing.assert_allclose(lengths, ref, atol=1e-6)
  assert L.resolve_attention_impl(None, jnp.bfloat16, 64) == (
      "cudnn" if jax.default_backend() == "gpu" else "xla")
  assert L.resolve_attention_impl(None, jnp.float32, 64) == "xla"
  with pytest.raises(ValueError, match="attention_impl"):
    L.resolve_attention_impl("flash", jnp.float32, 64)


def test_pooling_options(ckpt):
  b = tiny.batch("bert")
  m = from_pretrained(ckpt[0], head="sequence_classification", pooling="mean")
  out = jax.jit(m.apply)(m.params, b)
  h, mask = np.asarray(out.last_hidden_state), b["attention_mask"][..., None]
  np.testing.assert_allclose(np.asarray(out.pooled), (h * mask).sum(1) / mask.sum(1), atol=1e-6)
  assert "bert.pooler.dense.weight" in m.loading_info.unexpected
  cls = from_pretrained(ckpt[0], head="sequence_classification", pooling="cls")
  np.testing.assert_array_equal(np.asarray(jax.jit(cls.apply)(cls.params, b).pooled), h[:, 0])
  with pytest.raises(ValueError, match="no pooler"):
    init_random(tiny.hf_config("distilbert"), head="sequence_classification", num_labels=2,
                pooling="pooler")
