"""Quantization-aware training: fake-quantized weights in the forward, straight-through gradients.

fake_quant(w) = clip(round(w / s), -127, 127) * s with s = max|w| / 127 per output channel, i.e.
exactly the dequantized int8 weight of `jaxft.quant.int8.quantize` at the same w. Rounding has zero
gradient almost everywhere, so the backward pass uses the straight-through estimator (Bengio et al.
2013; used for BERT by Zafrir et al. 2019, Q8BERT): d fake_quant(w) / dw := I. The model trains
against the rounding error it will see after PTQ, while the float weights keep accumulating small
updates.

QAT is a params transform applied before apply_fn: `qat_term(term, spec)` wraps any loss term, so
it composes with `jaxft.objectives.base.make_step` (and with pruning masks) without a new step.
"""

from __future__ import annotations

from typing import Callable

import jax

from jaxft.quant.int8 import QuantSpec, channel_scale, quantize_with_scale
from jaxft.core.state import flatten, unflatten


def _fake_quant_fwd_value(w: jax.Array, channel_axis: int) -> jax.Array:
  scale = channel_scale(w, channel_axis)
  return (quantize_with_scale(w, scale) * scale).astype(w.dtype)


def fake_quant(w: jax.Array, channel_axis: int = -1) -> jax.Array:
  """Per-channel symmetric int8 fake quantization with a straight-through gradient (see module)."""

  @jax.custom_vjp
  def fq(x):
    return _fake_quant_fwd_value(x, channel_axis)

  def fwd(x):
    return fq(x), None

  def bwd(_, g):
    return (g,)

  fq.defvjp(fwd, bwd)
  return fq(w)


def fake_quant_params(params, spec: QuantSpec = QuantSpec()):
  """Nested params -> nested params with every leaf `spec` selects fake-quantized."""
  flat = flatten(params)
  out = {}
  for path, leaf in flat.items():
    axis = spec.channel_axis(path, leaf)
    out[path] = leaf if axis is None else fake_quant(leaf, axis)
  return unflatten(out)


def qat_apply(apply_fn: Callable, spec: QuantSpec = QuantSpec()) -> Callable:
  """apply_fn -> the same signature, with weights fake-quantized before the forward."""

  def apply(params, batch, **kwargs):
    return apply_fn(fake_quant_params(params, spec), batch, **kwargs)

  return apply


def qat_term(term, spec: QuantSpec = QuantSpec()):
  """Wraps a loss term `term(apply_fn, params, batch, rng, ctx)` so its forward passes see
  fake-quantized weights; gradients flow straight through to the float weights."""

  def wrapped(apply_fn, params, batch, rng, ctx):
    return term(qat_apply(apply_fn, spec), params, batch, rng, ctx)

  return wrapped
