"""Shared parity check: save a seeded transformers model, load it with jaxft, compare outputs."""

from __future__ import annotations

import jax
import numpy as np

from jaxft.models import from_pretrained

import hf_tiny as tiny

# README's parity claim for the tiny configs of every family (float32, CPU): hidden states,
# attention maps, pooler output and logits. Measured maxima sit between 1e-6 and 2e-6.
TOL = 2e-6


def max_diff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def check_family_head(family: str, head, tmp_path):
  """Last hidden state, head logits, all hidden states and attention maps within TOL (fp32)."""
  ref = tiny.torch_model(family, head)
  ref.save_pretrained(tmp_path / "ckpt")
  m = from_pretrained(tmp_path / "ckpt", head=head)
  info = m.loading_info
  assert (info.missing, info.unexpected, info.mismatched) == ([], [], [])
  b = tiny.batch(family)
  want = tiny.torch_forward(ref, family, b, output_hidden_states=True, output_attentions=True)
  apply = jax.jit(m.apply, static_argnames=("output_hidden_states", "output_attentions"))
  got = apply(m.params, b, output_hidden_states=True, output_attentions=True)
  layers = ref.config.num_hidden_layers
  assert len(got.hidden_states) == len(want.hidden_states) == layers + 1
  assert len(got.attentions) == len(want.attentions) == layers
  for g, w in zip(got.hidden_states, want.hidden_states):
    assert max_diff(g, w.numpy()) <= TOL
  for g, w in zip(got.attentions, want.attentions):
    assert g.shape == tuple(w.shape)
    assert max_diff(g, w.numpy()) <= TOL
  if head is None:
    assert max_diff(got.last_hidden_state, want.last_hidden_state.numpy()) <= TOL
    if getattr(want, "pooler_output", None) is not None:
      assert max_diff(got.pooled, want.pooler_output.numpy()) <= TOL
    assert got.logits is None
  else:
    if family != "vit":  # ViT's hidden_states[-1] is before the final LayerNorm
      assert max_diff(got.last_hidden_state, want.hidden_states[-1].numpy()) <= TOL
    assert got.logits.shape == tuple(want.logits.shape)
    assert max_diff(got.logits, want.logits.numpy()) <= TOL
  return m, got
