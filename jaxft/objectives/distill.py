"""Knowledge distillation: a frozen teacher's soft targets and intermediate states train a student.

The loss of one batch (classification; token classification averages over labeled tokens):

    L = alpha * CE(y, z_s) + (1 - alpha) * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))   (Hinton
        et al. 2015; the T^2 keeps the soft-target gradients on the scale of the hard ones)
      + hidden_weight    * mean_m MSE(h_s[m] W_h, h_t[map(m)])     (TinyBERT, Jiao et al. 2020)
      + attention_weight * mean_m MSE(A_s[m], A_t[map(m)])

z_s, z_t: student and teacher logits; h: hidden states (hidden_states[0] is the embedding output,
matched with its own projection W_e; hidden_states[i + 1] is layer i); A: attention probabilities
[B, heads, S, S]. W_h [H_s, H_t] and W_e are learned, stored in the student's trainable dict under
"distill_proj/hidden/kernel" and "distill_proj/embed/kernel", and dropped before the student's
forward (and by `strip_distill_params` before export). TinyBERT matches the pre-softmax attention
scores; ModelOutput exposes probabilities, so jaxft matches those (as MiniLM's attention transfer
does with KL); the two agree up to a per-row shift. Regression: the soft term is MSE(z_s, z_t).

The layer map sends student layer i (0-based) to a teacher layer: "uniform" (TinyBERT's g(m) =
m * L_t / L_s): (i + 1) * L_t // L_s - 1; "last": L_t - L_s + i; "first": i; or explicit indices.

The teacher is frozen by construction: its flat params live in `state.extras["teacher"]`, outside
`trainable`, so `make_step` never differentiates them, and its outputs pass through stop_gradient.
It runs deterministically (dropout off). Batch keys the term reads besides the student's:
  "teacher/<key>"   the teacher's own input_ids / attention_mask / token_type_ids when its
                    tokenizer differs (then only logit distillation is possible: sequence lengths
                    differ, so hidden/attention transfer raises);
  "teacher_logits"  precomputed teacher logits (`add_teacher_logits`), used instead of a teacher
                    forward when no intermediate transfer is asked for.

Packed batches (jaxft.data.packing): teacher and student read the same packed batch, so logits are
per slot [E, C] (token tasks [R, L, C]) and hidden states [R, L, H]; token weights come from
base.token_weights, and the attention term counts only (query, key) pairs of one segment, the pairs
a padded batch has (attention maps [R, N, L, L] are block-diagonal). A teacher with its own
tokenizer needs its own "teacher/segment_ids", "teacher/position_ids", "teacher/example_start".
"""

from __future__ import annotations

import copy
import dataclasses
import re
from typing import Mapping, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxft.objectives.base import (PACKING_KEYS, StepContext, Weighted, example_weights, is_packed,
                                   make_step, refuse_packing, token_weights)
from jaxft.objectives.supervised import IGNORE, cross_entropy, masked_mean
from jaxft.core.state import Flat, flatten, unflatten

TEACHER_PREFIX = "teacher/"
PROJ = "distill_proj"
# The student's keys that describe its tokens (a teacher with its own tokenizer brings its own).
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids") + PACKING_KEYS
LayerMap = Union[str, Sequence[int]]


def kl_divergence(teacher_logits: jax.Array, student_logits: jax.Array,
                  temperature: float = 1.0) -> jax.Array:
  """KL(p_t || p_s) over the last axis, p = softmax(logits / T): [..., C] -> [...] float32."""
  log_pt = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
  log_ps = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  return jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1)


def layer_map(spec: LayerMap, num_student: int, num_teacher: int) -> tuple[int, ...]:
  """Teacher layer index (0-based) for every student layer; see the module docstring."""
  if isinstance(spec, str):
    if spec == "uniform":
      idx = [(i + 1) * num_teacher // num_student - 1 for i in range(num_student)]
    elif spec == "last":
      idx = [num_teacher - num_student + i for i in range(num_student)]
    elif spec == "first":
      idx = list(range(num_student))
    elif re.fullmatch(r"\s*\d+(\s*,\s*\d+)*\s*", spec):
      idx = [int(x) for x in spec.split(",")]
    else:
      raise ValueError(f"unknown layer map {spec!r}; use 'uniform', 'last', 'first' or teacher "
                       "layer indices like '3,7,11'")
  else:
    idx = [int(x) for x in spec]
  if len(idx) != num_student:
    raise ValueError(f"layer map {spec!r} gives {len(idx)} teacher layers for a student with "
                     f"{num_student} layers; give one teacher layer per student layer")
  if any(not 0 <= i < num_teacher for i in idx):
    raise ValueError(f"layer map {spec!r} -> {idx} names layers outside the teacher's "
                     f"0..{num_teacher - 1}")
  return tuple(idx)


def init_projections(rng: jax.Array, student_hidden: int, teacher_hidden: int,
                     embeddings: bool = True) -> Flat:
  """Flat trainable params of the hidden-state projections W_h (and W_e), [H_s, H_t] float32.

  LeCun-normal (variance 1 / H_s) so a unit-scale LayerNorm output maps to unit scale. Add them to
  the student's trainable dict: `trainable = {**trainable, **init_projections(...)}`.
  """
  init = jax.nn.initializers.lecun_normal()
  k1, k2 = jax.random.split(rng)
  out = {f"{PROJ}/hidden/kernel": init(k1, (student_hidden, teacher_hidden), jnp.float32)}
  if embeddings:
    out[f"{PROJ}/embed/kernel"] = init(k2, (student_hidden, teacher_hidden), jnp.float32)
  return out


def strip_distill_params(flat: Flat) -> Flat:
  """Drops the distillation projections, leaving the student model's own params."""
  return {k: v for k, v in flat.items() if not k.startswith(PROJ + "/")}


def _with_num_layers(config, n: int):
  """A copy of a model config with n layers: an ArchConfig-like dataclass (`num_layers`), a
  transformers config (`num_hidden_layers`, DistilBERT's `n_layers`) or a plain dict."""
  if dataclasses.is_dataclass(config) and hasattr(config, "num_layers"):
    return dataclasses.replace(config, num_layers=n)
  for field in ("num_layers", "num_hidden_layers", "n_layers"):
    if isinstance(config, Mapping) and field in config:
      return {**config, field: n}
    if not isinstance(config, Mapping) and hasattr(config, field):
      out = copy.deepcopy(config)
      setattr(out, field, n)
      return out
  raise TypeError(f"cannot set the layer count of a {type(config).__name__}; expected a field "
                  "num_layers, num_hidden_layers or n_layers")


def _num_layers(config) -> int:
  for field in ("num_layers", "num_hidden_layers", "n_layers"):
    value = config.get(field) if isinstance(config, Mapping) else getattr(config, field, None)
    if value is not None:
      return int(value)
  raise TypeError(f"{type(config).__name__} has no num_layers / num_hidden_layers / n_layers")


def student_from_teacher_layers(teacher_params, teacher_config, layers: Sequence[int]):
  """A student of the teacher's family built from a subset of its layers (DistilBERT initialises
  from every other BERT layer; Sanh et al. 2019) -> (student params, student config).

  Teacher layer layers[j] becomes student layer j (params under ".../layer_<i>/" renamed);
  everything outside the layers (embeddings, pooler, head, MPNet's shared relative-position bias)
  is copied. The config is the teacher's with the new layer count. Params may be nested or flat;
  the result has the same form.
  """
  layers = [int(i) for i in layers]
  n_teacher = _num_layers(teacher_config)
  if not layers or len(set(layers)) != len(layers) or any(not 0 <= i < n_teacher for i in layers):
    raise ValueError(f"layers={layers}: need distinct teacher layer indices in 0..{n_teacher - 1}")
  flat_in = _is_flat(teacher_params)
  flat = dict(teacher_params) if flat_in else flatten(teacher_params)
  out, seen = {}, set()
  for path, value in flat.items():
    hit = re.search(r"(^|/)layer_(\d+)/", path)
    if hit is None:
      out[path] = value
      continue
    i = int(hit.group(2))
    seen.add(i)
    if i in layers:
      new = f"{hit.group(1)}layer_{layers.index(i)}/"
      out[path[:hit.start()] + new + path[hit.end():]] = value
  if seen != set(range(n_teacher)):
    raise ValueError(f"teacher params hold layers {sorted(seen)} but its config says {n_teacher}")
  return (out if flat_in else unflatten(out)), _with_num_layers(teacher_config, len(layers))


def distill_extras(teacher_params) -> dict:
  """State extras holding the frozen teacher: `TrainState.create(..., extras=distill_extras(tp))`."""
  return {"teacher": flatten(teacher_params) if not _is_flat(teacher_params) else dict(teacher_params)}


def _is_flat(tree) -> bool:
  return isinstance(tree, Mapping) and all(not isinstance(v, Mapping) for v in tree.values())


def student_batch(batch) -> dict:
  """The batch without teacher-only keys."""
  return {k: v for k, v in batch.items()
          if not k.startswith(TEACHER_PREFIX) and k != "teacher_logits"}


def teacher_batch(batch) -> dict:
  """The teacher's view: its own "teacher/<key>" inputs (and the student's non-token keys such as
  labels and example_mask) when present, else the student's batch."""
  own = {k[len(TEACHER_PREFIX):]: v for k, v in batch.items() if k.startswith(TEACHER_PREFIX)}
  base = student_batch(batch)
  if own and "input_ids" not in own:
    raise ValueError(f"batch has teacher keys {sorted(own)} but no 'teacher/input_ids'; a teacher "
                     "with its own tokenizer needs its own input_ids (and attention_mask)")
  if not own:
    return base
  if is_packed(base) and not is_packed(own):
    raise refuse_packing(
        "a distillation teacher with its own tokenizer", "the batch packs the student's tokens "
        "but has no 'teacher/segment_ids', 'teacher/position_ids', 'teacher/example_start' for "
        "the teacher's", "pack the teacher's tokens too, or --config.data.packing=false")
  # The student's token-level inputs do not describe the teacher's tokens: drop them all.
  return {**{k: v for k, v in base.items() if k not in TOKEN_INPUTS}, **own}


def add_teacher_logits(teacher_apply, teacher_params, batch) -> dict:
  """batch -> batch with "teacher_logits" (float32 numpy), for caching the teacher once per example."""
  out = teacher_apply(teacher_params, teacher_batch(batch), rng=None, deterministic=True)
  return {**batch, "teacher_logits": np.asarray(out.logits, np.float32)}


def _token_mask(batch) -> jax.Array:
  """[B, S] (packed [R, L]) float32 weights of real tokens in real examples."""
  return token_weights(batch)


def _pair_mask(batch, token_w: jax.Array) -> jax.Array:
  """[B, S, S] float32 weights of (query, key) pairs: both real tokens (and, packed, of one
  segment: a packed row's cross-segment pairs do not exist in a padded batch)."""
  pair_w = token_w[:, :, None] * token_w[:, None, :]
  if is_packed(batch):
    seg = batch["segment_ids"]
    pair_w = pair_w * (seg[:, :, None] == seg[:, None, :])
  return pair_w


def hidden_mse(student_h: jax.Array, teacher_h: jax.Array, kernel, token_w: jax.Array) -> jax.Array:
  """Mean over real tokens of mean_d (h_s W - h_t)^2; h [B, S, H], W [H_s, H_t] or None (identity)."""
  hs = student_h.astype(jnp.float32)
  if kernel is not None:
    hs = hs @ kernel
  elif hs.shape[-1] != teacher_h.shape[-1]:
    raise ValueError(f"student hidden {hs.shape[-1]} != teacher hidden {teacher_h.shape[-1]} and "
                     f"no '{PROJ}/...' projection in the trainable params; add init_projections()")
  per_token = jnp.mean(jnp.square(hs - teacher_h.astype(jnp.float32)), axis=-1)
  return masked_mean(per_token, token_w)


def attention_mse(student_a: jax.Array, teacher_a: jax.Array, token_w: jax.Array,
                  heads: str = "match", pair_w: jax.Array | None = None) -> jax.Array:
  """MSE of attention maps [B, h, S, S] over real (query, key) pairs, averaged over heads.

  heads: "match" needs equal head counts (TinyBERT's students keep the teacher's 12 heads); "mean"
  compares the head-averaged maps when the counts differ. pair_w [B, S, S]: the pairs' weights
  (default token_w_q * token_w_k; packed batches pass `_pair_mask`).
  """
  sa, ta = student_a.astype(jnp.float32), teacher_a.astype(jnp.float32)
  if heads == "mean":
    sa, ta = sa.mean(1, keepdims=True), ta.mean(1, keepdims=True)
  elif heads != "match":
    raise ValueError(f"attention_heads must be 'match' or 'mean', got {heads!r}")
  if sa.shape != ta.shape:
    raise ValueError(f"student attention {sa.shape} vs teacher {ta.shape}: head counts differ; set "
                     "attention_heads='mean' to compare head-averaged maps")
  if pair_w is None:
    pair_w = token_w[:, :, None] * token_w[:, None, :]  # [B, S, S]
  per_pair = jnp.mean(jnp.square(sa - ta), axis=1)  # [B, S, S]
  return masked_mean(per_pair, pair_w)


def soft_target_loss(kind: str, student_logits, teacher_logits, batch, alpha: float,
                     temperature: float):
  """alpha * hard loss + (1 - alpha) * soft loss for a task kind -> (loss, metrics)."""
  w = example_weights(batch)
  labels = batch.get("labels")
  if kind == "classification":
    kl = masked_mean(kl_divergence(teacher_logits, student_logits, temperature), w)
    hard = masked_mean(cross_entropy(student_logits, labels), w) if labels is not None else 0.0
    agree = masked_mean((jnp.argmax(student_logits, -1) == jnp.argmax(teacher_logits, -1))
                        .astype(jnp.float32), w)
    soft = temperature ** 2 * kl
  elif kind == "token_classification":
    if labels is None:
      raise ValueError("token-classification distillation needs 'labels' to know which tokens count")
    tok_w = token_weights(batch, labels)
    kl = masked_mean(kl_divergence(teacher_logits, student_logits, temperature), tok_w)
    hard = masked_mean(cross_entropy(student_logits, jnp.where(labels == IGNORE, 0, labels)), tok_w)
    agree = masked_mean((jnp.argmax(student_logits, -1) == jnp.argmax(teacher_logits, -1))
                        .astype(jnp.float32), tok_w)
    soft = temperature ** 2 * kl
  elif kind == "regression":
    pred = student_logits[..., 0].astype(jnp.float32)
    kl = masked_mean(jnp.square(pred - teacher_logits[..., 0].astype(jnp.float32)), w)
    hard = (masked_mean(jnp.square(pred - labels.astype(jnp.float32)), w)
            if labels is not None else 0.0)
    agree = jnp.zeros((), jnp.float32)
    soft = kl
  else:
    raise ValueError(f"no distillation loss for task kind {kind!r}; known: classification, "
                     "token_classification, regression")
  if labels is None and alpha:
    raise ValueError("alpha > 0 weights the hard-label loss but the batch has no 'labels'; set "
                     "alpha=0 for label-free distillation")
  loss = alpha * hard + (1.0 - alpha) * soft
  return loss, {"hard": jnp.asarray(hard, jnp.float32), "soft": kl, "agreement": agree}


def distill_term(teacher_apply, *, kind: str = "classification", alpha: float = 0.5,
                 temperature: float = 2.0, hidden_weight: float = 0.0,
                 attention_weight: float = 0.0, layers: LayerMap = "uniform",
                 attention_heads: str = "match"):
  """The distillation loss term (module docstring) for `make_step`; reads the teacher from
  ctx.extras["teacher"]. Metrics: hard, soft (KL or MSE to the teacher), agreement, hidden_mse,
  attention_mse."""
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha must be in [0, 1], got {alpha}")
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  want_h, want_a = hidden_weight > 0, attention_weight > 0

  def term(apply_fn, params, batch, rng, ctx: StepContext):
    proj = params.get(PROJ, {})
    model_params = {k: v for k, v in params.items() if k != PROJ}
    own_tokenizer = any(k.startswith(TEACHER_PREFIX) for k in batch)
    if own_tokenizer and (want_h or want_a):
      raise ValueError("hidden-state/attention transfer needs teacher and student on the same "
                       "tokens, but the batch carries 'teacher/...' inputs (a different "
                       "tokenizer); set hidden_weight=attention_weight=0")
    sb = student_batch(batch)
    out_s = apply_fn(model_params, sb, rng=rng, deterministic=False,
                     output_hidden_states=want_h, output_attentions=want_a)
    out_t = None
    if want_h or want_a or "teacher_logits" not in batch:
      if "teacher" not in ctx.extras:
        raise KeyError("distillation needs the teacher in state.extras['teacher']; create the state "
                       "with extras=distill_extras(teacher_params)")
      teacher_params = unflatten(jax.lax.stop_gradient(ctx.extras["teacher"]))
      out_t = teacher_apply(teacher_params, teacher_batch(batch), rng=None, deterministic=True,
                            output_hidden_states=want_h, output_attentions=want_a)
      out_t = jax.lax.stop_gradient(out_t)
    t_logits = jax.lax.stop_gradient(batch["teacher_logits"] if "teacher_logits" in batch
                                     else out_t.logits)
    loss, metrics = soft_target_loss(kind, out_s.logits, t_logits, sb, alpha, temperature)

    token_w = _token_mask(sb) if (want_h or want_a) else None
    if want_h:
      hs, ht = out_s.hidden_states, out_t.hidden_states
      idx = layer_map(layers, len(hs) - 1, len(ht) - 1)
      k_h, k_e = proj.get("hidden", {}).get("kernel"), proj.get("embed", {}).get("kernel")
      per = [hidden_mse(hs[i + 1], ht[j + 1], k_h, token_w) for i, j in enumerate(idx)]
      if k_e is not None or hs[0].shape[-1] == ht[0].shape[-1]:
        per.append(hidden_mse(hs[0], ht[0], k_e, token_w))
      h_loss = jnp.mean(jnp.stack(per))
      loss = loss + hidden_weight * h_loss
      metrics["hidden_mse"] = h_loss
    if want_a:
      sa, ta = out_s.attentions, out_t.attentions
      idx = layer_map(layers, len(sa), len(ta))
      pair_w = _pair_mask(sb, token_w)
      a_loss = jnp.mean(jnp.stack([attention_mse(sa[i], ta[j], token_w, attention_heads, pair_w)
                                   for i, j in enumerate(idx)]))
      loss = loss + attention_weight * a_loss
      metrics["attention_mse"] = a_loss
    return loss, metrics

  return term


def make_distill_step(student_apply, teacher_apply, tx: optax.GradientTransformation, *,
                      kind: str = "classification", alpha: float = 0.5, temperature: float = 2.0,
                      hidden_weight: float = 0.0, attention_weight: float = 0.0,
                      layers: LayerMap = "uniform", attention_heads: str = "match",
                      extra_terms: Mapping[str, Weighted] | None = None, step_factory=make_step,
                      **step_kwargs):
  """The distillation train step `step(state, batch, rng) -> (state, metrics)`.

  The state is the student's (`trainable` may include `init_projections`) with the teacher in
  `extras=distill_extras(teacher_params)`. Built from `make_step` (same optimizer logic, gradient
  accumulation, NaN policy and metrics: loss/distill, distill/hard, distill/soft,
  distill/agreement, distill/hidden_mse, distill/attention_mse, grad_norm, ...). extra_terms are
  added to the sum (e.g. a consistency term); step_kwargs go to make_step (lr_schedule,
  grad_accum_steps, nan_policy, post_update, update_extras).
  """
  terms = {"distill": Weighted(distill_term(
      teacher_apply, kind=kind, alpha=alpha, temperature=temperature, hidden_weight=hidden_weight,
      attention_weight=attention_weight, layers=layers, attention_heads=attention_heads))}
  for name in extra_terms or {}:
    if name in terms:
      raise ValueError(f"extra term name {name!r} clashes with the distillation term")
  terms.update(extra_terms or {})
  return step_factory(student_apply, terms, tx, **step_kwargs)
