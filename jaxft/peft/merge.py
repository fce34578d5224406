"""Folding LoRA / DoRA / (IA)^3 into the base kernels, for inference and export.

For a `jaxft.models.peft_layers.Dense` with kernel W [in, out], bias b [out], and scale
s = alpha / r (alpha / sqrt(r) with rsLoRA), the layer computes

    LoRA:    y = x (W + s A B) + b                        A [in, r], B [r, out]
    DoRA:    y = x (m * V / ||V||_c) + b,  V = W + s A B   m [out], ||V||_c = column norms [out]
    (IA)^3:  y = (x W' + b) * l                           l [out], W' the kernel above

so each merges exactly into a plain Dense: W_merged = W' * l[None, :], b_merged = b * l. With PiSSA
(`init_pissa`, Meng et al. 2024) W is the residual W - s A0 B0 of the loaded kernel and the same
fold gives the fine-tuned full kernel. Adapters,
prefixes and prompts add computation a plain encoder does not have, so they cannot merge; export
them unmerged (`jaxft.peft.export(..., merged=False)`).
"""

from __future__ import annotations

import re
from typing import Mapping

import jax.numpy as jnp

from jaxft.models.peft_layers import PeftSpec, init_dora, init_pissa, lora_delta
from jaxft.peft.rules import PEFT_LEAF

__all__ = ["init_dora", "init_pissa", "merge", "peft_leaf_paths", "unmergeable_paths"]

_FOLDABLE = ("lora_a", "lora_b", "dora_m", "ia3")
_UNMERGEABLE = ("adapter_down", "adapter_up", "prefix_key", "prefix_value", "prompt")


def _walk(tree, prefix=""):
  """Yields (path, node) for every dict node of a nested params tree."""
  yield prefix, tree
  for k, v in tree.items():
    if isinstance(v, Mapping):
      yield from _walk(v, f"{prefix}{k}/")


def _fold(node: Mapping, spec: PeftSpec, path: str) -> dict:
  """One Dense node {kernel, bias?, lora_a?, lora_b?, dora_m?, ia3?} -> {kernel, bias?}."""
  if "kernel" not in node:
    raise ValueError(f"{path} has {sorted(set(node) & set(_FOLDABLE))} but no kernel to merge into")
  if ("lora_a" in node) != ("lora_b" in node):
    raise ValueError(f"{path} has only one of lora_a / lora_b")
  if "dora_m" in node and "lora_a" not in node:
    raise ValueError(f"{path} has dora_m without lora_a / lora_b")
  out = {k: v for k, v in node.items() if k not in _FOLDABLE}
  kernel = node["kernel"]
  w = kernel.astype(jnp.float32)
  if "lora_a" in node:
    w = w + lora_delta(node, spec, path)
    if "dora_m" in node:
      if not spec.dora:
        raise ValueError(f"{path} has dora_m but the PeftSpec has dora=False")
      w = w * (node["dora_m"].astype(jnp.float32) / jnp.linalg.norm(w, axis=0))
  if "ia3" in node:
    scale = node["ia3"].astype(jnp.float32)
    w = w * scale[None, :]
    if "bias" in node:
      out["bias"] = (node["bias"].astype(jnp.float32) * scale).astype(node["bias"].dtype)
  out["kernel"] = w.astype(kernel.dtype)
  return out


def unmergeable_paths(params) -> list[str]:
  """Paths of adapter / prefix / prompt parameters, which have no merged form."""
  return [f"{p}{k}" for p, node in _walk(params) for k in node if k in _UNMERGEABLE]


def merge(params, spec: PeftSpec):
  """Nested params with LoRA / DoRA / (IA)^3 folded into their kernels (and biases) and the PEFT
  leaves removed. The result loads into the model built with the plain `PeftSpec()` and gives the
  same outputs up to float32 rounding. Raises if adapters, prefixes or prompts are present."""
  bad = unmergeable_paths(params)
  if bad:
    raise ValueError(f"cannot merge {len(bad)} adapter/prefix/prompt parameter(s) (e.g. {bad[0]}): "
                     "these methods add layers or tokens a plain encoder does not have. Export "
                     "them unmerged: jaxft.peft.export(model, params, out_dir, merged=False)")

  def rec(tree, prefix):
    if any(k in _FOLDABLE for k in tree):
      return _fold(tree, spec, prefix.rstrip("/"))
    return {k: rec(v, f"{prefix}{k}/") if isinstance(v, Mapping) else v for k, v in tree.items()}

  return rec(params, "")


def peft_leaf_paths(flat) -> list[str]:
  """Flat paths created by PEFT hooks (what `save_pretrained` refuses and `merge` removes)."""
  return [p for p in flat if re.search(PEFT_LEAF, p)]
