"""Adaptive pseudo-label selection: FlexMatch, FreeMatch, SoftMatch, and distribution alignment.

Each objective is FixMatch's  L = L_sup + lambda(t) * L_unsup  (jaxft.objectives.consistency: same
batch layout, weak view u under "unlabeled/", strong view A(u) under "unlabeled/strong/", ramp-up,
pseudo_label_accuracy from "unlabeled/labels") with another rule for which rows, or with which
weight, the hard pseudo-label y^_i = argmax_c p_ic of p = softmax(f(u)) trains f(A(u)):

  L_unsup = sum_i w_i m_i CE(f(A(u_i)), y^_i) / sum_i w_i     (w_i: real unlabeled rows)

  flexmatch  m_i = [max_c p_ic >= tau * M(beta_{y^_i})], M(x) = x / (2 - x)    (Zhang et al. 2021)
             beta_c: the share of the pool whose last confident (>= tau) prediction is c, over the
             largest class share (with threshold_warmup, over max(largest, never confident)).
  freematch  m_i = [max_c p_ic >= tau_t * p~_t(y^_i) / max_c p~_t(c)]             (Wang et al. 2023)
             tau_t = EMA of mean_i max_c p_ic, p~_t = EMA of mean_i p_i, plus the self-adaptive
             fairness L_f = -H(SumNorm(p~_t / h~_t), SumNorm(p-bar / h-bar)) = sum_c a_c log b_c,
             where h~_t = EMA of the histogram of y^, and p-bar, h-bar are the mean probabilities
             and argmax histogram of the strong view over the rows m keeps.
  softmatch  m_i = exp(-min(max_c p_ic - mu_t, 0)^2 / (2 sigma_t^2 / n_sigma^2))  (Chen et al. 2023)
             mu_t, sigma_t^2 = EMAs of the batch mean and (unbiased) variance of max_c p_ic; p may
             be uniformly aligned first (below), while y^ stays the argmax of the unaligned p.

Distribution alignment (ReMixMatch, Berthelot et al. 2020; AdaMatch, Berthelot et al. 2022), the
option `dist_align` of every objective here and of fixmatch: p <- SumNorm(p * (p_target + 1e-6) /
(p_model + 1e-6)), with p_model the EMA of the batch mean of p (the first batch sets it) and
p_target uniform, the EMA of the labeled batch's label histogram ("labels"), or the EMA of the
model's mean prediction on the labeled rows ("model", one more forward pass).

Running state. Each objective keeps its statistics under state.extras[<name>] (float32 arrays,
checkpointed and restored with the state). Like USB (microsoft/Semi-supervised-learning), FreeMatch,
SoftMatch and alignment fold the current batch into their EMAs before using them, and FlexMatch
thresholds with the memory of the previous steps. A term cannot write the state, so it reports the
state after its batch among its metrics as "<term>/_state/<name>/<key>" arrays; the objective's
update_extras copies them into the extras after an applied update (a skipped non-finite step keeps
the old ones), and its wrap_step drops them from the metrics the step returns, which stay scalars.
With gradient accumulation the reported states are averaged over the micro-batches: exact for the
EMAs of means, while SoftMatch's variance is that of a micro-batch and FlexMatch's memory advances
by one (averaged) micro-batch per step.

FlexMatch's memory. USB keeps the last confident prediction of every pool row, indexed by the
row's position in the pool. jaxft batches do not carry that index, so the memory here is its
expected class histogram over the `pool_size` rows (fractions, last entry: never confident),
updated from batch counts: of the S confident rows of a batch (s_c per class), the share phi that
visits the pool for the first time (exact: the unlabeled order walks a permutation of the pool)
takes its slot from "never confident"; the rest take slots distributed like the memory itself:
  n <- n + (s - phi S e_unused - (1 - phi) S n) / pool_size.
During the first pass over the pool this is USB's memory exactly; afterwards it is its
expectation when a revisited row's old entry is independent of its new prediction.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from jaxft.objectives.base import StepContext, example_weights
from jaxft.objectives.consistency import (
    COMMON_OPTIONS, DIST_ALIGN_OPTIONS, NOISE_OPTIONS, UNLABELED, Noise, check_options,
    confidence_mask, fixmatch_term, noise_of, semi_objective, target_accuracy, two_views)
from jaxft.objectives.registry import Objective, register
from jaxft.objectives.supervised import cross_entropy, masked_mean

f32 = jnp.float32
STATE = "_state/"
DIST_ALIGN_TARGETS = ("uniform", "labels", "model")

# ---------------------------------------------------------------------------------------------
# Running state: reported by the term, stored by update_extras, hidden from the step's metrics.


def report(name: str, state: dict) -> dict:
  """The term metrics carrying the state after this batch: {"_state/<name>/<key>": array}."""
  return {f"{STATE}{name}/{k}": jnp.asarray(v, f32) for k, v in state.items()}


def reported(metrics: dict, name: str) -> dict:
  """The state `report(name, ...)` put among a step's metrics (under whichever term reported it)."""
  marker = f"/{STATE}{name}/"
  found: dict[str, dict] = {}
  for key, value in metrics.items():
    if marker in "/" + key:  # a term's own metrics have no "<term>/" prefix yet
      term, k = ("/" + key).split(marker, 1)
      found.setdefault(term, {})[k] = value
  if len(found) != 1:
    raise ValueError(f"expected one loss term reporting the {name!r} state, found "
                     f"{sorted(found) or 'none'}: compose each adaptive objective's term once")
  return next(iter(found.values()))


def state_extras(name: str, init: dict):
  """-> (init_extras, update_extras) keeping `init`'s keys under extras[name]."""
  init = {k: jnp.asarray(v, f32) for k, v in init.items()}

  def init_extras(trainable, frozen):
    return {name: {k: jnp.array(v) for k, v in init.items()}}  # own buffers: the state is donated

  def update_extras(old_state, new_state, metrics):
    new = reported(metrics, name)
    return {**new_state.extras, name: {k: new[k].astype(f32) for k in init}}

  return init_extras, update_extras


def without_state(step_factory: Callable) -> Callable:
  """A part's wrap_step: the step it builds returns the metrics without the reported states."""

  def factory(*args, **kwargs):
    step = step_factory(*args, **kwargs)

    def wrapped(state, batch, rng):
      new_state, metrics = step(state, batch, rng)
      return new_state, {k: v for k, v in metrics.items() if f"/{STATE}" not in "/" + k}

    return wrapped

  return factory


def _state(ctx: StepContext, name: str) -> dict:
  if name not in ctx.extras:
    raise ValueError(f"objective {name!r} keeps running state in state.extras[{name!r}]: create "
                     "the TrainState with extras=objective.init_extras(trainable, frozen)")
  return ctx.extras[name]


# ---------------------------------------------------------------------------------------------
# Statistics and selection rules on probabilities (pure; tested against hand computations).


def weighted_mean(x: jax.Array, w: jax.Array) -> jax.Array:
  """Mean over the rows of x [B, ...] with weights w [B]; 0 when no row counts."""
  w = w.reshape(w.shape + (1,) * (x.ndim - 1))
  return jnp.sum(x * w, 0) / jnp.maximum(jnp.sum(w), 1.0)


def ema(old, new, decay: float):
  return decay * old + (1.0 - decay) * new


def sum_norm(x: jax.Array) -> jax.Array:
  """x / sum(x) over the last axis; all-zero rows stay zero."""
  s = jnp.sum(x, -1, keepdims=True)
  return x / jnp.where(s > 0, s, 1.0)


def inverse_or_zero(x: jax.Array) -> jax.Array:
  """1 / x, and 0 where x = 0 (FreeMatch's scalers)."""
  return jnp.where(x > 0, 1.0 / jnp.where(x > 0, x, 1.0), 0.0)


def align(probs: jax.Array, p_model: jax.Array, p_target: jax.Array) -> jax.Array:
  """Distribution alignment: SumNorm(p * (p_target + 1e-6) / (p_model + 1e-6)) over classes."""
  return sum_norm(probs * (p_target + 1e-6) / (p_model + 1e-6))


def flex_class_rates(memory: jax.Array, warmup: bool) -> jax.Array:
  """FlexMatch's learning effects beta [C] from the memory [C + 1] (class shares, then the share
  never confident): sigma_c / max_c sigma_c, or over max(max_c sigma_c, unused) with threshold
  warmup. All zero while nothing was confident."""
  counts, unused = memory[:-1], memory[-1]
  top = jnp.max(counts)
  denom = jnp.maximum(top, unused) if warmup else top
  return counts / jnp.where(denom > 0, denom, 1.0)


def flex_thresholds(threshold: float, beta: jax.Array) -> jax.Array:
  """tau * M(beta), FlexMatch's convex mapping M(x) = x / (2 - x): 0 at beta = 0, tau at 1."""
  return threshold * beta / (2.0 - beta)


def flex_memory_update(memory, visited, confident, rows, pool_size: int):
  """(memory [C + 1], rows visited so far) after a batch of `rows` real rows with confident [C]
  confident predictions per class: see the module docstring. -> (memory, visited)."""
  total = jnp.sum(confident)
  fresh = jnp.clip(pool_size - visited, 0.0, rows) / jnp.maximum(rows, 1.0)
  unused = jnp.zeros_like(memory).at[-1].set(1.0)
  added = jnp.concatenate([confident, jnp.zeros((1,), f32)])
  memory = memory + (added - fresh * total * unused - (1.0 - fresh) * total * memory) / pool_size
  return jnp.maximum(memory, 0.0), jnp.minimum(visited + rows, float(pool_size))


def freematch_thresholds(time_p: jax.Array, p_model: jax.Array) -> jax.Array:
  """FreeMatch's self-adaptive class thresholds tau_t * MaxNorm(p~_t) [C]."""
  return time_p * p_model / jnp.max(p_model)


def fairness_loss(student_logits, keep, p_model, label_hist) -> jax.Array:
  """FreeMatch's self-adaptive fairness sum_c a_c log(b_c + 1e-12), a = SumNorm(p~ / h~) (no
  gradient), b = SumNorm(p-bar / h-bar) from the student's probabilities and argmax histogram over
  the rows `keep` [B] weights (h-bar's scaler without gradient, 1/0 = 0); 0 when none is kept."""
  q = jax.nn.softmax(student_logits.astype(f32), -1)
  n = jnp.sum(keep)
  hist = weighted_mean(jax.nn.one_hot(jnp.argmax(q, -1), q.shape[-1]), keep)
  a = jax.lax.stop_gradient(sum_norm(p_model * inverse_or_zero(label_hist)))
  b = sum_norm(weighted_mean(q, keep) * jax.lax.stop_gradient(inverse_or_zero(hist)))
  return jnp.where(n > 0, jnp.sum(a * jnp.log(b + 1e-12)), 0.0)


def soft_weights(conf: jax.Array, mu, var, n_sigma: float) -> jax.Array:
  """SoftMatch's truncated Gaussian exp(-min(conf - mu, 0)^2 / (2 var / n_sigma^2)): 1 above mu."""
  var = jnp.maximum(var, 1e-12)
  return jnp.exp(-jnp.square(jnp.minimum(conf - mu, 0.0)) / (2.0 * var / n_sigma**2))


def weighted_var(x: jax.Array, w: jax.Array) -> jax.Array:
  """Unbiased variance of x [B] over the rows w [B] keeps (torch.var's default)."""
  n = jnp.sum(w)
  mean = jnp.sum(x * w) / jnp.maximum(n, 1.0)
  return jnp.sum(w * jnp.square(x - mean)) / jnp.maximum(n - 1.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Distribution alignment.


@dataclasses.dataclass(frozen=True)
class DistAlign:
  """Distribution alignment with EMA statistics (decay d), USB's DistAlignEMAHook.

  target: "uniform" (1/C), "labels" (EMA of the labeled batch's label histogram, ReMixMatch's
  marginal of the labeled data) or "model" (EMA of the model's mean prediction on the labeled rows,
  AdaMatch's; one more forward pass, no gradient). State entries: da_model [C], da_target [C],
  da_updates (the first batch sets da_model to its own mean).
  """
  target: str = "uniform"
  decay: float = 0.999

  def init(self, num_classes: int) -> dict:
    uniform = lambda: jnp.full((num_classes,), 1.0 / num_classes, f32)
    return {"da_model": uniform(), "da_target": uniform(), "da_updates": jnp.zeros((), f32)}

  def __call__(self, state, probs, w, batch, apply_fn, params, rng):
    """-> (aligned probs [B, C], the state entries after this batch)."""
    mean = weighted_mean(probs, w)
    p_model = jnp.where(state["da_updates"] > 0, ema(state["da_model"], mean, self.decay), mean)
    p_target = state["da_target"]
    if self.target != "uniform":
      labeled = {k: v for k, v in batch.items() if not k.startswith(UNLABELED)}
      if self.target == "labels":
        seen = jax.nn.one_hot(labeled["labels"], probs.shape[-1])
      else:
        inputs = {k: v for k, v in labeled.items() if k != "labels"}
        logits = apply_fn(params, inputs, rng=rng, deterministic=False).logits
        seen = jax.lax.stop_gradient(jax.nn.softmax(logits.astype(f32), -1))
      p_target = ema(p_target, weighted_mean(seen, example_weights(labeled)), self.decay)
    entries = {"da_model": p_model, "da_target": p_target,
               "da_updates": state["da_updates"] + 1.0}
    return align(probs, p_model, p_target), entries


def _aligned(da: DistAlign | None, state, probs, w, batch, apply_fn, params, rng):
  if da is None:
    return probs, {}
  return da(state, probs, w, batch, apply_fn, params, rng)


def _views(apply_fn, params, batch, rng, name, noise=Noise()):
  """-> (p = softmax of the weak view's logits (no gradient), strong logits, w, a spare key)."""
  r_views, r_more = jax.random.split(rng)
  target, student, w = two_views(apply_fn, params, batch, r_views, name, need_strong=True,
                                  noise=noise)
  return jax.nn.softmax(target, -1), student, w, r_more


# ---------------------------------------------------------------------------------------------
# Loss terms: term(apply_fn, params, batch, rng, ctx) -> (loss, metrics).


def flexmatch_term(threshold: float, pool_size: int, warmup: bool = True,
                   dist_align: DistAlign | None = None, name: str = "flexmatch"):
  def term(apply_fn, params, batch, rng, ctx: StepContext):
    state = _state(ctx, name)
    probs, student, w, r = _views(apply_fn, params, batch, rng, name)
    probs, entries = _aligned(dist_align, state, probs, w, batch, apply_fn, params, r)
    conf, pseudo = jnp.max(probs, -1), jnp.argmax(probs, -1)
    thresholds = flex_thresholds(threshold, flex_class_rates(state["memory"], warmup))
    mask = (conf >= thresholds[pseudo]).astype(f32)
    loss = masked_mean(cross_entropy(student, pseudo) * mask, w)
    selected = (conf >= threshold) * w  # the memory counts confidence against tau itself
    confident = jnp.sum(jax.nn.one_hot(pseudo, probs.shape[-1]) * selected[:, None], 0)
    memory, visited = flex_memory_update(state["memory"], state["visited"], confident, jnp.sum(w),
                                         pool_size)
    metrics = {"mask_rate": masked_mean(mask, w), **target_accuracy(batch, pseudo, mask, w),
               "threshold": jnp.mean(thresholds), "unused": state["memory"][-1],
               **report(name, {"memory": memory, "visited": visited, **entries})}
    return loss, metrics
  return term


def freematch_term(decay: float = 0.999, fairness: float = 0.0,
                   dist_align: DistAlign | None = None, name: str = "freematch"):
  """loss = L_u + fairness * L_f (the objective passes fairness_weight / weight, so that the step
  adds weight * L_u + fairness_weight * L_f)."""
  def term(apply_fn, params, batch, rng, ctx: StepContext):
    state = _state(ctx, name)
    probs, student, w, r = _views(apply_fn, params, batch, rng, name)
    probs, entries = _aligned(dist_align, state, probs, w, batch, apply_fn, params, r)
    conf, pseudo = jnp.max(probs, -1), jnp.argmax(probs, -1)
    time_p = ema(state["time_p"], weighted_mean(conf, w), decay)
    p_model = ema(state["p_model"], weighted_mean(probs, w), decay)
    hist = weighted_mean(jax.nn.one_hot(pseudo, probs.shape[-1]), w)
    label_hist = ema(state["label_hist"], hist, decay)
    thresholds = freematch_thresholds(time_p, p_model)
    mask = (conf >= thresholds[pseudo]).astype(f32)
    consistency = masked_mean(cross_entropy(student, pseudo) * mask, w)
    fair = fairness_loss(student, mask * w, p_model, label_hist)
    metrics = {"mask_rate": masked_mean(mask, w), **target_accuracy(batch, pseudo, mask, w),
               "threshold": jnp.mean(thresholds), "global_threshold": time_p,
               "consistency": consistency, "fairness": fair,
               **report(name, {"time_p": time_p, "p_model": p_model, "label_hist": label_hist,
                               **entries})}
    return consistency + fairness * fair, metrics
  return term


def softmatch_term(decay: float = 0.999, n_sigma: float = 2.0,
                   dist_align: DistAlign | None = None, name: str = "softmatch"):
  def term(apply_fn, params, batch, rng, ctx: StepContext):
    state = _state(ctx, name)
    probs, student, w, r = _views(apply_fn, params, batch, rng, name)
    pseudo = jnp.argmax(probs, -1)  # from the unaligned p, as in SoftMatch
    aligned, entries = _aligned(dist_align, state, probs, w, batch, apply_fn, params, r)
    conf = jnp.max(aligned, -1)
    mu = ema(state["mu"], weighted_mean(conf, w), decay)
    var = ema(state["var"], weighted_var(conf, w), decay)
    weights = soft_weights(conf, mu, var, n_sigma)
    loss = masked_mean(cross_entropy(student, pseudo) * weights, w)
    metrics = {"mask_rate": masked_mean(weights, w), **target_accuracy(batch, pseudo, weights, w),
               "mu": mu, "sigma": jnp.sqrt(var),
               **report(name, {"mu": mu, "var": var, **entries})}
    return loss, metrics
  return term


def fixmatch_dist_align_term(threshold: float, dist_align: DistAlign, noise: Noise = Noise(),
                             name: str = "fixmatch"):
  """FixMatch on aligned probabilities: y^ = argmax and mask = max >= tau of the aligned p."""
  def term(apply_fn, params, batch, rng, ctx: StepContext):
    state = _state(ctx, name)
    probs, student, w, r = _views(apply_fn, params, batch, rng, name, noise)
    probs, entries = dist_align(state, probs, w, batch, apply_fn, params, r)
    pseudo, mask = jnp.argmax(probs, -1), confidence_mask(probs, threshold)
    loss = masked_mean(cross_entropy(student, pseudo) * mask, w)
    return loss, {"mask_rate": masked_mean(mask, w), **target_accuracy(batch, pseudo, mask, w),
                  **report(name, entries)}
  return term


# ---------------------------------------------------------------------------------------------
# Registered objectives.


def _dist_align(name, options) -> DistAlign | None:
  if options.dist_align_target not in DIST_ALIGN_TARGETS:
    raise ValueError(f"objective.{name}.dist_align_target must be one of "
                     f"{', '.join(DIST_ALIGN_TARGETS)}, got {options.dist_align_target!r}")
  _check_decay(name, "dist_align_decay", options.dist_align_decay)
  if not options.dist_align:
    return None
  return DistAlign(options.dist_align_target, float(options.dist_align_decay))


def _check_decay(name, key, value):
  if not 0.0 <= value < 1.0:
    raise ValueError(f"objective.{name}.{key} must be in [0, 1), got {value}")


def _adaptive(name, options, info, term, init: dict, da: DistAlign | None) -> Objective:
  if da is not None:
    init = {**init, **da.init(info.num_labels)}
  init_extras, update_extras = state_extras(name, init)
  return semi_objective(options, info, term, init_extras=init_extras, update_extras=update_extras,
               wrap_step=without_state, strong_view=True)


@register("flexmatch", defaults={**COMMON_OPTIONS, "threshold": 0.95, "threshold_warmup": True,
                                 "pool_size": 0, **DIST_ALIGN_OPTIONS})
def flexmatch(options, info) -> Objective:
  check_options("flexmatch", options, info)
  da = _dist_align("flexmatch", options)
  if options.pool_size <= 0:
    raise ValueError("objective.flexmatch.pool_size must be the number of unlabeled pool rows "
                     "(the data log line 'semi-supervised: ... N unlabeled' at startup gives it); "
                     f"got {options.pool_size}")
  c = info.num_labels
  init = {"memory": jnp.zeros((c + 1,), f32).at[-1].set(1.0), "visited": 0.0}
  term = flexmatch_term(float(options.threshold), int(options.pool_size),
                        bool(options.threshold_warmup), da)
  return _adaptive("flexmatch", options, info, term, init, da)


@register("freematch", defaults={**COMMON_OPTIONS, "ema_decay": 0.999, "fairness_weight": 0.01,
                                 "state_init": "uniform", **DIST_ALIGN_OPTIONS})
def freematch(options, info) -> Objective:
  check_options("freematch", options, info)
  da = _dist_align("freematch", options)
  _check_decay("freematch", "ema_decay", options.ema_decay)
  if options.state_init not in ("uniform", "ones"):
    raise ValueError("objective.freematch.state_init must be 'uniform' (the paper's 1/C) or "
                     f"'ones' (USB's code), got {options.state_init!r}")
  if options.fairness_weight < 0 or (options.fairness_weight > 0 and options.weight <= 0):
    raise ValueError("objective.freematch.fairness_weight must be >= 0, and needs weight > 0 "
                     f"(got fairness_weight={options.fairness_weight}, weight={options.weight})")
  c = info.num_labels
  v = 1.0 / c if options.state_init == "uniform" else 1.0
  init = {"time_p": v, "p_model": jnp.full((c,), v, f32), "label_hist": jnp.full((c,), v, f32)}
  fairness = float(options.fairness_weight) / float(options.weight) if options.weight > 0 else 0.0
  term = freematch_term(float(options.ema_decay), fairness, da)
  return _adaptive("freematch", options, info, term, init, da)


@register("softmatch", defaults={**COMMON_OPTIONS, "ema_decay": 0.999, "n_sigma": 2.0,
                                 **DIST_ALIGN_OPTIONS, "dist_align": True})
def softmatch(options, info) -> Objective:
  check_options("softmatch", options, info)
  da = _dist_align("softmatch", options)
  _check_decay("softmatch", "ema_decay", options.ema_decay)
  if options.n_sigma <= 0:
    raise ValueError(f"objective.softmatch.n_sigma must be > 0, got {options.n_sigma}")
  init = {"mu": 1.0 / info.num_labels, "var": 1.0}
  term = softmatch_term(float(options.ema_decay), float(options.n_sigma), da)
  return _adaptive("softmatch", options, info, term, init, da)


@register("fixmatch", defaults={**COMMON_OPTIONS, "threshold": 0.95, **NOISE_OPTIONS,
                                **DIST_ALIGN_OPTIONS})
def fixmatch(options, info) -> Objective:
  """FixMatch (consistency.fixmatch_term); with dist_align, its aligned term with running state."""
  check_options("fixmatch", options, info)
  if not options.dist_align:
    return semi_objective(options, info, fixmatch_term(float(options.threshold), noise_of(options)),
                 strong_view=True)
  da = _dist_align("fixmatch", options)
  term = fixmatch_dist_align_term(float(options.threshold), da, noise_of(options))
  return _adaptive("fixmatch", options, info, term, {}, da)
