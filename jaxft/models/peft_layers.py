"""The hooks through which PEFT methods add parameters to the model ports.

Every model family builds its projections with `Dense`, calls `Adapter` after the attention output
and the feed-forward output projections, `Prefix` inside self-attention and `Prompt` after the
embeddings. With the default `PeftSpec()` all of them are the plain layer or the identity, and the
parameter tree is exactly the Hugging Face one (kernel/bias names as nn.Dense).

Parameter names added here are what `jaxft.peft.rules` keys on: `lora_a`, `lora_b`, `dora_m`,
`ia3`, `adapter_*`, `prefix_key`, `prefix_value`, `prompt`. They live with the models, which build
with them; `jaxft.peft` (rules, methods, merge) sits above and imports them from here.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp


LORA_INITS = ("default", "pissa")


@dataclasses.dataclass(frozen=True)
class PeftSpec:
  """Which PEFT parameters the model creates. Hashable: it lives in the (static) module config.

  lora_rank: r of LoRA, W x + (alpha / r) B A x (Hu et al. 2021); 0 disables LoRA.
  lora_alpha: alpha; the scale is alpha / r, or alpha / sqrt(r) with `rslora` (Kalajdzievski 2023).
  lora_dropout: dropout on the LoRA branch input.
  lora_targets: regex searched in the Dense module's '/'-joined path inside the model
    ("query|value" matches .../self/query; "intermediate" matches .../intermediate/dense;
    "output/dense" matches both the attention-output and the FFN-output projection of BERT).
  rslora: scale alpha / sqrt(r) instead of alpha / r.
  lora_init: "default" (A ~ U(+-1/sqrt(in)), B = 0, as Hugging Face PEFT) or "pissa" (Meng et al.
    2024: A, B from the top-r singular triplets of the pretrained W, W replaced by the residual;
    applied after the weights load, by `init_pissa`).
  dora: DoRA (Liu et al. 2024): W' = m * (W + s B A) / ||W + s B A||_col, m initialised to ||W||_col.
  ia3_targets: regex of Dense paths whose outputs (IA)^3 rescales by a learned vector l (init 1).
  adapter_size: bottleneck width of adapters; 0 disables them.
  adapter_kind: "houlsby" (after attention and after FFN) or "pfeiffer" (after FFN only).
  prefix_length: number of learned key/value vectors prepended in every self-attention layer.
  prompt_length: number of learned embedding vectors inserted after the first ([CLS]) token.
  """

  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_dropout: float = 0.0
  lora_targets: str = "query|value"
  rslora: bool = False
  lora_init: str = "default"
  dora: bool = False
  ia3_targets: str = ""
  adapter_size: int = 0
  adapter_kind: str = "houlsby"
  prefix_length: int = 0
  prompt_length: int = 0

  def __post_init__(self):
    if self.lora_init not in LORA_INITS:
      raise ValueError(f"PeftSpec.lora_init={self.lora_init!r}; known: {', '.join(LORA_INITS)}")

  def lora_on(self, path: str) -> bool:
    return self.lora_rank > 0 and bool(re.search(self.lora_targets, path))

  def ia3_on(self, path: str) -> bool:
    return bool(self.ia3_targets) and bool(re.search(self.ia3_targets, path))

  @property
  def lora_scale(self) -> float:
    r = self.lora_rank
    return self.lora_alpha / (math.sqrt(r) if self.rslora else r)


# LoRA's A as in Hugging Face PEFT (kaiming_uniform with a = sqrt(5)): U(-1/sqrt(in), 1/sqrt(in)),
# so learning rates tuned there transfer. B starts at zero, so LoRA starts at the pretrained W.
_LORA_A_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _lora_params(module: nn.Module, in_features: int, features: int, dtype):
  r = module.peft.lora_rank
  a = module.param("lora_a", _LORA_A_INIT, (in_features, r), dtype)
  b = module.param("lora_b", nn.initializers.zeros, (r, features), dtype)
  return a, b


class Dense(nn.Module):
  """nn.Dense with optional LoRA / DoRA / (IA)^3 on top; param names `kernel` [in, out] and `bias`.

  Targets are chosen by regex over the module's path ("encoder/layer_0/attention/self/query").
  LoRA: y = x W + s (dropout(x) A) B + b, A [in, r], B [r, out], s = lora_scale.
  DoRA: y = x (m * V / ||V||_c) + b with V = W + s A B and ||.||_c the norm of each output column
  (no dropout on this path: the DoRA kernel is formed before the matmul).
  (IA)^3: the output above times l [out]. `jaxft.peft.merge` folds all three into kernel and bias.
  """

  features: int
  peft: PeftSpec = PeftSpec()
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.normal(0.02)

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    in_features = x.shape[-1]
    kernel = self.param("kernel", self.kernel_init, (in_features, self.features), self.param_dtype)
    bias = (self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
            if self.use_bias else None)
    dtype = self.dtype or x.dtype
    path = "/".join(self.path) or self.name or ""
    lora = self.peft.lora_on(path)
    if lora and self.peft.dora:
      a, b = _lora_params(self, in_features, self.features, self.param_dtype)
      merged = kernel + self.peft.lora_scale * (a @ b)
      # Column norm over the input axis. Initialised from this (random) kernel; after pretrained
      # weights are loaded, `init_dora` resets m to ||W0||_c so DoRA starts at W0.
      m = self.param("dora_m", lambda _, w: jnp.linalg.norm(w, axis=0), kernel)
      kernel = merged * (m / jnp.linalg.norm(merged, axis=0))
      y = jnp.dot(x.astype(dtype), kernel.astype(dtype))
    else:
      y = jnp.dot(x.astype(dtype), kernel.astype(dtype))
      if lora:
        a, b = _lora_params(self, in_features, self.features, self.param_dtype)
        h = nn.Dropout(self.peft.lora_dropout)(x, deterministic=deterministic)
        # The scale multiplies the rank-r activations, not the [.., out] product: r / out of
        # the elementwise work (bitwise the same for power-of-two scales such as 16 / 8).
        low = jnp.dot(h.astype(dtype), a.astype(dtype))
        y = y + jnp.dot(low * jnp.asarray(self.peft.lora_scale, dtype), b.astype(dtype))
    if bias is not None:
      y = y + bias.astype(dtype)
    if self.peft.ia3_on(path):
      y = y * self.param("ia3", nn.initializers.ones, (self.features,), self.param_dtype).astype(dtype)
    return y


class Adapter(nn.Module):
  """Bottleneck adapter x + W_up act(W_down x) (Houlsby et al. 2019); identity when disabled.

  `where` is "attn" or "ffn": Houlsby adapters sit after both, Pfeiffer after the FFN only. W_up
  starts at zero so an added adapter leaves the pretrained function unchanged.
  """

  peft: PeftSpec = PeftSpec()
  where: str = "ffn"
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    size = self.peft.adapter_size
    if size <= 0 or (self.peft.adapter_kind == "pfeiffer" and self.where != "ffn"):
      return x
    h = nn.Dense(size, dtype=self.dtype, kernel_init=nn.initializers.normal(1e-3),
                 name="adapter_down")(x)
    h = nn.gelu(h, approximate=False)
    h = nn.Dense(x.shape[-1], dtype=self.dtype, kernel_init=nn.initializers.zeros,
                 name="adapter_up")(h)
    return x + h


class Prefix(nn.Module):
  """Learned key/value prefixes for one attention layer (Li & Liang 2021).

  Returns (key_prefix, value_prefix), each [prefix_length, num_heads, head_dim], or None when
  disabled. The attention must prepend them to keys/values and count them as unmasked.
  """

  peft: PeftSpec = PeftSpec()
  num_heads: int = 1
  head_dim: int = 1

  @nn.compact
  def __call__(self):
    n = self.peft.prefix_length
    if n <= 0:
      return None
    shape = (n, self.num_heads, self.head_dim)
    k = self.param("prefix_key", nn.initializers.normal(0.02), shape)
    v = self.param("prefix_value", nn.initializers.normal(0.02), shape)
    return k, v


class Prompt(nn.Module):
  """Soft prompt tuning (Lester et al. 2021): inserts prompt_length learned vectors after token 0.

  (h [B, S, H], mask [B, S]) -> (h [B, S + P, H], mask [B, S + P]). The model drops those P
  positions again before its head (`strip`), so token-level heads keep their alignment.
  """

  peft: PeftSpec = PeftSpec()

  @nn.compact
  def __call__(self, h, mask):
    n = self.peft.prompt_length
    if n <= 0:
      return h, mask
    p = self.param("prompt", nn.initializers.normal(0.02), (n, h.shape[-1])).astype(h.dtype)
    p = jnp.broadcast_to(p[None], (h.shape[0], n, h.shape[-1]))
    h = jnp.concatenate([h[:, :1], p, h[:, 1:]], axis=1)
    mask = jnp.concatenate([mask[:, :1], jnp.ones((mask.shape[0], n), mask.dtype), mask[:, 1:]], 1)
    return h, mask

  def strip(self, h):
    n = self.peft.prompt_length
    if n <= 0:
      return h
    return jnp.concatenate([h[:, :1], h[:, 1 + n:]], axis=1)


def lora_delta(node: Mapping, spec: PeftSpec, path: str):
  """s A B [in, out] float32 of one Dense node {lora_a [in, r], lora_b [r, out], ...}; raises if
  the spec disagrees with the node (no LoRA, or another rank)."""
  a, b = node["lora_a"], node["lora_b"]
  if spec.lora_rank <= 0:
    raise ValueError(f"{path} has LoRA parameters but the PeftSpec has lora_rank=0; pass the spec "
                     "the model was built with (jaxft.peft.spec_from_config(config.peft))")
  if a.shape[-1] != spec.lora_rank or b.shape[0] != spec.lora_rank:
    raise ValueError(f"{path}: lora_a {a.shape} / lora_b {b.shape} do not have rank "
                     f"{spec.lora_rank} of the PeftSpec")
  return spec.lora_scale * (a.astype(jnp.float32) @ b.astype(jnp.float32))


def init_dora(params, spec: PeftSpec):
  """Sets every DoRA magnitude to the column norms of its merged kernel, m = ||W + s A B||_c.

  DoRA starts from the pretrained function only if m = ||W0||_c of the *pretrained* W0. A module's
  init sees random kernels, so whoever loads pretrained weights into a freshly initialised tree
  must call this afterwards (with B = 0 at init, m becomes ||W0||_c)."""

  def rec(tree, prefix):
    if "dora_m" in tree:
      w = tree["kernel"].astype(jnp.float32) + lora_delta(tree, spec, prefix.rstrip("/"))
      m = tree["dora_m"]
      return {**tree, "dora_m": jnp.linalg.norm(w, axis=0).astype(m.dtype)}
    return {k: rec(v, f"{prefix}{k}/") if isinstance(v, Mapping) else v for k, v in tree.items()}

  return rec(params, "")


def init_pissa(params, spec: PeftSpec):
  """PiSSA (Meng et al. 2024, "Principal Singular values and Singular vectors Adaptation"): for every
  LoRA-carrying kernel W [in, out] = U S V^T (float32 SVD), with r = lora_rank and s = lora_scale,

      A = U_r sqrt(S_r / s)  [in, r],   B = sqrt(S_r / s) V_r^T  [r, out],   W_res = W - s A B,

  so s A B = U_r S_r V_r^T is W's best rank-r part (it trains) and W_res the rest (frozen), and the
  layer x W_res + s (x A) B computes x W: the model starts at the pretrained function (up to float32
  rounding). Like `init_dora`, it transforms pretrained weights, so whoever loads them calls it
  afterwards (before `init_dora`, which then sets m = ||W_res + s A B||_c = ||W||_c). W_res depends
  only on U_r S_r V_r^T, which does not change with the SVD's sign choices, so building the same
  spec over the same checkpoint gives the same W_res (bitwise on one machine): that is what lets an
  unmerged PEFT checkpoint (A, B only) load again. `jaxft.peft.merge` folds W_res + s A B back."""

  def rec(tree, prefix):
    if "lora_a" in tree:
      path = prefix.rstrip("/")
      w = tree["kernel"].astype(jnp.float32)
      r = spec.lora_rank
      if r > min(w.shape):
        raise ValueError(f"{path}: PiSSA rank {r} exceeds the kernel's smallest side {w.shape}")
      u, sv, vt = jnp.linalg.svd(w, full_matrices=False)
      root = jnp.sqrt(sv[:r] / spec.lora_scale)
      a = u[:, :r] * root[None, :]
      b = root[:, None] * vt[:r]
      res = w - spec.lora_scale * (a @ b)
      return {**tree, "kernel": res.astype(tree["kernel"].dtype),
              "lora_a": a.astype(tree["lora_a"].dtype), "lora_b": b.astype(tree["lora_b"].dtype)}
    return {k: rec(v, f"{prefix}{k}/") if isinstance(v, Mapping) else v for k, v in tree.items()}

  return rec(params, "")
