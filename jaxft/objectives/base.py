"""Loss terms and the generic train-step factory every objective composes.

A loss term is a small pure function

    term(apply_fn, params, batch, rng, ctx) -> (loss: f32[], metrics: dict[str, f32[]])

where `apply_fn(params, batch, *, rng, deterministic, embedding_perturbation=None,
output_hidden_states=False, output_attentions=False) -> ModelOutput`, `params` is the nested
parameter tree (trainable and frozen merged), and `ctx` is a `StepContext` (the step number and the
state's `extras`, e.g. an EMA teacher). A step is L = sum_i w_i(step) * L_i, differentiated with
respect to the trainable leaves only.

`make_step` returns the pure, unjitted `step(state, batch, rng) -> (state, metrics)`; jitting with
donation and shardings is `jaxft.train.mesh`'s job.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Protocol, Union

import flax
import jax
import jax.numpy as jnp
import optax

from jaxft.core.state import Flat, TrainState, merge_params

Schedule = Callable[[jax.Array], jax.Array]


@flax.struct.dataclass
class StepContext:
  step: jax.Array
  extras: dict


class LossTerm(Protocol):

  def __call__(self, apply_fn, params, batch, rng, ctx: StepContext) -> tuple[jax.Array, dict]:
    ...


@dataclasses.dataclass(frozen=True)
class Weighted:
  """A term with its weight: a float, or a schedule step -> weight (e.g. a ramp-up lambda(t))."""

  term: LossTerm
  weight: Union[float, Schedule] = 1.0

  def weight_at(self, step):
    return self.weight(step) if callable(self.weight) else jnp.asarray(self.weight, jnp.float32)


def example_weights(batch) -> jax.Array:
  """[B] float32: 1 for real examples, 0 for rows that only pad the last batch."""
  some = next(iter(v for k, v in batch.items() if k in ("input_ids", "pixel_values", "labels")))
  return batch.get("example_mask", jnp.ones(some.shape[:1], jnp.float32)).astype(jnp.float32)


def global_norm(tree) -> jax.Array:
  return optax.tree.norm(tree) if jax.tree_util.tree_leaves(tree) else jnp.zeros(())


def clip_by_norm(tree, norm: jax.Array, max_norm: float):
  """Global-norm clipping (Pascanu et al. 2013) with a norm computed once by the caller: the same
  select as optax.clip_by_global_norm, so results are bitwise those of the optax chain."""
  trigger = norm < max_norm
  return jax.tree_util.tree_map(
      lambda t: jax.lax.select(trigger, t, (t / norm.astype(t.dtype)) * max_norm), tree)


def make_loss_fn(apply_fn, terms: Mapping[str, Weighted]):
  """-> loss_fn(trainable, frozen, batch, rng, ctx) -> (total, metrics) for jax.value_and_grad."""
  if not terms:
    raise ValueError("a step needs at least one loss term")

  def loss_fn(trainable: Flat, frozen: Flat, batch, rng, ctx: StepContext):
    params = merge_params(trainable, frozen)
    total = jnp.zeros((), jnp.float32)
    metrics = {}
    for i, (name, wt) in enumerate(sorted(terms.items())):
      loss, term_metrics = wt.term(apply_fn, params, batch, jax.random.fold_in(rng, i), ctx)
      w = wt.weight_at(ctx.step)
      total = total + w * loss
      metrics[f"loss/{name}"] = loss
      if not isinstance(wt.weight, (int, float)):
        metrics[f"weight/{name}"] = w
      metrics.update({f"{name}/{k}": v for k, v in term_metrics.items()})
    metrics["loss"] = total
    return total, metrics

  return loss_fn


def _split_micro(batch, n: int):
  def f(x):
    if x.shape[0] % n:
      raise ValueError(f"batch of {x.shape[0]} does not split into {n} gradient-accumulation "
                       "micro-batches; make train.batch_size a multiple of train.grad_accum_steps")
    return x.reshape((n, x.shape[0] // n) + x.shape[1:])
  return jax.tree_util.tree_map(f, batch)


def make_step(apply_fn,
              terms: Mapping[str, Weighted],
              tx: optax.GradientTransformation,
              *,
              lr_schedule: Schedule | None = None,
              grad_accum_steps: int = 1,
              grad_clip: float = 0.0,
              nan_policy: str = "skip",
              update_extras: Callable[[TrainState, TrainState, Any], dict] | None = None,
              post_update: Callable[[Flat, TrainState], Flat] | None = None,
              prepare: Callable[[TrainState], TrainState] | None = None,
              spike_guard=None,
              log_norms: bool = False,
              guard_in_optimizer: bool = False):
  """Builds the pure train step `step(state, batch, rng) -> (state, metrics)`.

  grad_accum_steps: the batch [B, ...] is split into that many micro-batches whose gradients are
    averaged (lax.scan, so memory is that of one micro-batch).
  grad_clip: > 0 clips the gradients to that global norm before `tx` (give it here rather than
    as optax.clip_by_global_norm in tx: the step computes the norm once for clipping, the
    finiteness check and the grad_norm metric).
  nan_policy: "skip": a step whose loss or gradients are not finite leaves trainable params,
    optimizer state and extras bitwise unchanged and counts `skipped_steps`; "error": the same,
    and the loop raises at the next log step naming the step range; "none": no guard. Gradients
    count as non-finite when their global norm is (an element that is NaN or +-Inf makes it so;
    so does a sum of squares beyond float32, ~|g| > 1e19, which no healthy step reaches).
  update_extras(old_state, new_state, metrics) -> extras: e.g. EMA teacher updates, after the update.
  post_update(trainable, state) -> trainable: e.g. re-applying pruning masks to updated weights.
  prepare(state) -> state: a change of the state the gradients are taken at (e.g. new pruning
    masks on a schedule step); part of the step, so a skipped step drops it too.
  spike_guard: a jaxft.train.spike.SpikeGuard (its entries in extras): an update whose gradient norm
    is far above the recent median is skipped like a non-finite one, counted in `spike_skipped`.
  log_norms: also return param_norm and update_norm every step (two more reductions over every
    leaf; the loop logs param_norm at log steps without them).
  guard_in_optimizer: `tx` takes the skip decision as `tx.update(..., apply_update=ok)` and keeps
    its own state where it is False (jaxft.train.optim.make_optimizer(guarded=True)); the step
    then only keeps the params. Otherwise the step selects the old optimizer state itself, which
    costs XLA a copy of the moments.
  A skipped update is a select between the new and the old buffers inside the update's own
  elementwise fusion, not a conditional: no host round trip for the predicate.
  Metrics: loss, loss/<term>, <term>/<metric>, grad_norm (before clipping), lr, nonfinite (0/1),
  skipped_steps (running count); param_norm, update_norm with log_norms.
  """
  if nan_policy not in ("skip", "error", "none"):
    raise ValueError(f"nan_policy must be 'skip', 'error' or 'none', got {nan_policy!r}")
  loss_fn = make_loss_fn(apply_fn, terms)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  guarded = nan_policy != "none" or spike_guard is not None

  def compute_grads(state: TrainState, batch, rng):
    ctx = StepContext(step=state.step, extras=state.extras)
    if grad_accum_steps == 1:
      (_, metrics), grads = grad_fn(state.trainable, state.frozen, batch, rng, ctx)
      return grads, metrics
    micro = _split_micro(batch, grad_accum_steps)

    def body(carry, xs):
      i, mb = xs
      (_, m), g = grad_fn(state.trainable, state.frozen, mb, jax.random.fold_in(rng, i), ctx)
      acc_g, acc_m = carry
      return (jax.tree_util.tree_map(jnp.add, acc_g, g),
              jax.tree_util.tree_map(jnp.add, acc_m, m)), None

    zeros_g = jax.tree_util.tree_map(jnp.zeros_like, state.trainable)
    first_mb = jax.tree_util.tree_map(lambda x: x[0], micro)
    m_shape = jax.eval_shape(lambda: grad_fn(state.trainable, state.frozen, first_mb, rng, ctx)[0][1])
    zeros_m = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), m_shape)
    (g, m), _ = jax.lax.scan(body, (zeros_g, zeros_m),
                             (jnp.arange(grad_accum_steps), micro))
    scale = 1.0 / grad_accum_steps
    return (jax.tree_util.tree_map(lambda x: x * scale, g),
            jax.tree_util.tree_map(lambda x: x * scale, m))

  def update(state: TrainState, grads, metrics, apply_it):
    """The optimizer update -> (new state, updates)."""
    if guard_in_optimizer:
      updates, new_opt_state = tx.update(grads, state.opt_state, state.trainable,
                                         apply_update=apply_it)
      new_trainable = jax.tree_util.tree_map(
          lambda p, u: jnp.where(apply_it, (p + u).astype(p.dtype), p), state.trainable, updates)
    else:
      updates, new_opt_state = tx.update(grads, state.opt_state, state.trainable)
      new_trainable = optax.apply_updates(state.trainable, updates)
    new_state = state.replace(step=state.step + 1, trainable=new_trainable, opt_state=new_opt_state)
    if post_update is not None:
      new_state = new_state.replace(trainable=post_update(new_state.trainable, new_state))
    if update_extras is not None:
      new_state = new_state.replace(extras=update_extras(state, new_state, metrics))
    return new_state, updates

  def step(state: TrainState, batch, rng):
    before = state
    if prepare is not None:
      state = prepare(state)
    rng = jax.random.fold_in(rng, state.step)
    grads, metrics = compute_grads(state, batch, rng)
    grad_norm = global_norm(grads)
    finite = jnp.logical_and(jnp.isfinite(metrics["loss"]), jnp.isfinite(grad_norm))
    spike, spike_entries = jnp.zeros((), bool), {}
    if spike_guard is not None:
      spike, spike_entries = spike_guard.check(state.extras, grad_norm)
    if grad_clip > 0:
      grads = clip_by_norm(grads, grad_norm, grad_clip)
    apply_it = jnp.ones((), bool)
    if guarded:
      apply_it = jnp.logical_not(spike)
      if nan_policy != "none":
        apply_it = jnp.logical_and(apply_it, finite)
    new_state, updates = update(state, grads, metrics, apply_it)
    if guarded:
      keep = lambda new, old: jnp.where(apply_it, new, old)
      kept = dict(extras=jax.tree_util.tree_map(keep, new_state.extras, before.extras))
      if not guard_in_optimizer:
        kept["opt_state"] = jax.tree_util.tree_map(keep, new_state.opt_state, state.opt_state)
      if not guard_in_optimizer or post_update is not None or prepare is not None:
        # (else update() kept the params)
        kept["trainable"] = jax.tree_util.tree_map(keep, new_state.trainable, before.trainable)
      new_state = new_state.replace(**kept)
      skipped = state.extras["skipped_steps"]
      if nan_policy != "none":
        skipped = skipped + jnp.logical_not(finite).astype(jnp.int32)
      # The window sees every norm, skipped or not.
      new_state = new_state.replace(extras={**new_state.extras, "skipped_steps": skipped,
                                            **spike_entries})
    skipped = new_state.extras["skipped_steps"]

    metrics = dict(metrics)
    metrics["grad_norm"] = grad_norm
    if log_norms:
      metrics["param_norm"] = global_norm(new_state.trainable)
      metrics["update_norm"] = jnp.where(apply_it, global_norm(updates), 0.0)
    metrics["lr"] = (lr_schedule(state.step) if lr_schedule is not None
                     else jnp.zeros((), jnp.float32))
    metrics["nonfinite"] = jnp.logical_not(finite).astype(jnp.float32)
    metrics["skipped_steps"] = skipped.astype(jnp.float32)
    if spike_guard is not None:
      metrics["spike"] = spike.astype(jnp.float32)
      metrics["spike_skipped"] = new_state.extras["spike_skipped"].astype(jnp.float32)
    return new_state, metrics

  return step
