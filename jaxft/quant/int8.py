"""Post-training int8 weight quantization: symmetric, per output channel.

For a weight w with output channels along `channel_axis` (the last axis of a Dense kernel
[in, out]; the first axis, one row per token, of an embedding table [V, H]):

    scale_c = max_i |w_ic| / 127            (float32 [C]; a channel of zeros gets scale 0)
    q_ic    = clip(round(w_ic / scale_c), -127, 127)   (int8; -128 unused, so the range is symmetric)
    w~_ic   = q_ic * scale_c                (the dequantized weight)

so |w_ic - w~_ic| <= scale_c / 2 (round to nearest). Weights only: activations stay float, which
is "W8A32" (weight-only) quantization; it shrinks the model about 4x and keeps accuracy close to
fp32 for BERT-size encoders (Zafrir et al. 2019, Q8BERT, report < 1 point on GLUE with QAT).

Quantized parameters are a flat '/'-path dict like TrainState's, where a quantized leaf is a
`QTensor(q: int8, scale: float32)` pytree and every other leaf stays as it was. `quantized_apply`
wraps a model's apply_fn so evaluation runs on the int8 weights, dequantizing inside the jitted
forward.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

from jaxft.core.state import Flat, flatten, unflatten

QMAX = 127


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """Which leaves to quantize and along which axis their output channels lie.

  kernels: regex searched in the flat path of 2-D leaves quantized per output channel (last axis).
  embeddings: regex of 2-D embedding tables quantized per row (axis 0); "" leaves them in float.
  exclude: regex of paths never quantized (e.g. PEFT or distillation extras).
  Biases, LayerNorm scales and any non-2-D leaf always stay float: they are a tiny share of the
  bytes and the most sensitive to rounding.
  """

  kernels: str = r"(^|/)kernel$"
  embeddings: str = ""
  exclude: str = ""

  def channel_axis(self, path: str, leaf) -> int | None:
    """-> the output-channel axis of this leaf, or None when it stays float."""
    if getattr(leaf, "ndim", 0) != 2 or (self.exclude and re.search(self.exclude, path)):
      return None
    if re.search(self.kernels, path):
      return 1
    if self.embeddings and re.search(self.embeddings, path):
      return 0
    return None


@flax.struct.dataclass
class QTensor:
  """q: int8, the weight's shape. scale: float32 with size 1 on every axis but the channel axis
  (e.g. [1, out] for a kernel), so `q * scale` broadcasts back to the weight."""

  q: jax.Array
  scale: jax.Array

  def dequantize(self, dtype=jnp.float32) -> jax.Array:
    return (self.q.astype(jnp.float32) * self.scale).astype(dtype)

  @property
  def nbytes(self) -> int:
    return int(self.q.size * self.q.dtype.itemsize + self.scale.size * self.scale.dtype.itemsize)


def channel_scale(w: jax.Array, channel_axis: int) -> jax.Array:
  """scale = max|w| / 127 over every axis but `channel_axis`, keepdims (float32)."""
  axes = tuple(a for a in range(w.ndim) if a != channel_axis % w.ndim)
  return jnp.max(jnp.abs(w.astype(jnp.float32)), axis=axes, keepdims=True) / QMAX


def quantize_with_scale(w: jax.Array, scale: jax.Array) -> jax.Array:
  """round(w / scale) clipped to [-127, 127], as float32 integers; 0 where scale == 0.

  The single rounding rule that both PTQ (`quantize`) and QAT (`jaxft.quant.qat.fake_quant`) use,
  so a fake-quantized forward equals the dequantized int8 forward bit for bit.
  """
  safe = jnp.where(scale > 0, scale, 1.0)
  return jnp.clip(jnp.round(w.astype(jnp.float32) / safe), -QMAX, QMAX)


def quantize(w: jax.Array, channel_axis: int = -1) -> QTensor:
  """Float weight -> QTensor(int8 q, float32 per-channel scale), symmetric (zero point 0)."""
  scale = channel_scale(w, channel_axis)
  return QTensor(q=quantize_with_scale(w, scale).astype(jnp.int8), scale=scale)


def quantize_params(flat: Flat, spec: QuantSpec = QuantSpec()) -> dict:
  """Flat float params -> flat dict with QTensor leaves where `spec` selects, others unchanged."""
  if not isinstance(flat, Mapping) or any(isinstance(v, Mapping) for v in flat.values()):
    raise TypeError("quantize_params takes a flat '/'-path dict (TrainState.trainable/frozen or "
                    "jaxft.core.state.flatten(params)), not a nested tree")
  out = {}
  for path, leaf in flat.items():
    axis = spec.channel_axis(path, leaf)
    out[path] = leaf if axis is None else quantize(leaf, axis)
  if not any(isinstance(v, QTensor) for v in out.values()):
    raise ValueError(f"QuantSpec selected no parameter to quantize (kernels={spec.kernels!r}, "
                     f"embeddings={spec.embeddings!r}); check the regexes against the param paths")
  return out


def dequantize_params(qflat: Mapping, dtype=jnp.float32) -> Flat:
  """QTensor leaves -> float weights q * scale; other leaves unchanged."""
  return {k: v.dequantize(dtype) if isinstance(v, QTensor) else v for k, v in qflat.items()}


def quantized_apply(apply_fn: Callable) -> Callable:
  """apply_fn(params, batch, **kw) -> apply(qflat, batch, **kw) that runs on int8 weights.

  The returned function takes the flat quantized dict; under jit the int8 arrays are what lives in
  device memory and the dequantization is fused into the forward.
  """

  def apply(qflat, batch, **kwargs):
    return apply_fn(unflatten(dequantize_params(qflat)), batch, **kwargs)

  return apply


def _nbytes(leaf) -> int:
  if isinstance(leaf, QTensor):
    return leaf.nbytes
  return int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize


def size_report(flat: Flat, qflat: Mapping) -> dict:
  """Model size in bytes before and after quantization.

  Returns fp32_bytes (every leaf at its stored dtype, float32 for checkpoints), int8_bytes (int8
  weights + float32 scales + the leaves kept in float), ratio (fp32 / int8), quantized_params and
  total_params (element counts), quantized_leaves.
  """
  if set(flat) != set(qflat):
    raise ValueError("size_report needs the float params and their quantized version of the same "
                     f"model; paths differ: {sorted(set(flat) ^ set(qflat))[:5]}")
  fp32 = sum(_nbytes(v) for v in flat.values())
  int8 = sum(_nbytes(v) for v in qflat.values())
  qleaves = [k for k, v in qflat.items() if isinstance(v, QTensor)]
  return {
      "fp32_bytes": int(fp32),
      "int8_bytes": int(int8),
      "ratio": float(fp32) / float(int8),
      "quantized_params": int(sum(qflat[k].q.size for k in qleaves)),
      "total_params": int(sum(int(np.prod(v.shape)) for v in flat.values())),
      "quantized_leaves": len(qleaves),
  }


def quantize_tree(params, spec: QuantSpec = QuantSpec()) -> dict:
  """Nested params -> flat quantized dict (convenience for `from_pretrained(...)` params)."""
  return quantize_params(flatten(params), spec)
