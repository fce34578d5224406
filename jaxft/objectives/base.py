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

Padded and packed batches. A padded batch has one example per row: [B, S] token arrays, [B] example
arrays. A packed one (jaxft.data.packing, `data.packing`) holds E example slots in R rows of L
tokens: token arrays [R, L] with `segment_ids` (slot + 1, 0 at padding), `position_ids`, and
`example_start` [E]; example arrays (example_mask, sequence labels, logits) are [E]. Terms read the
difference only through the helpers here: `example_weights` [N], `token_weights` [R, L],
`ExampleLayout` (per-example sums, maxima and noise over token arrays) and `concat_batches`; on a
padded batch each is exactly the row-wise code it replaced, so padded results are unchanged bitwise.
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


IGNORE = -100  # token label of positions no loss reads (padding, non-first sub-tokens)
PACKING_KEYS = ("segment_ids", "position_ids", "example_start")
PACKING_FIX = "--config.data.packing=false"


def is_packed(batch) -> bool:
  """Whether `batch` is packed (jaxft.data.packing): several examples per row, `segment_ids`."""
  return "segment_ids" in batch


def refuse_packing(what: str, why: str, fix: str = PACKING_FIX) -> ValueError:
  """The error a method that cannot run on packed batches raises (the caller raises it)."""
  return ValueError(f"{what} cannot run on packed batches (data.packing): {why}. Fix: {fix}")


def example_weights(batch) -> jax.Array:
  """[N] float32: 1 for real examples, 0 for rows (padded, N = B) or slots (packed, N = E) that
  only fill the batch's static shape."""
  if "example_mask" in batch:
    return batch["example_mask"].astype(jnp.float32)
  if is_packed(batch):
    return jnp.ones(batch["example_start"].shape[:1], jnp.float32)
  some = next(iter(v for k, v in batch.items() if k in ("input_ids", "pixel_values", "labels")))
  return jnp.ones(some.shape[:1], jnp.float32)


def _slot_of_token(batch) -> jax.Array:
  """int32 [R, L]: the slot each token of a packed batch belongs to (0 at padding: mask it)."""
  return jnp.maximum(batch["segment_ids"].astype(jnp.int32) - 1, 0)


def token_weights(batch, labels=None) -> jax.Array:
  """float32 per-token weights: example weight (example_mask) times whether the token counts.

  A token counts when labels != IGNORE (token labels given) or, without labels, when it is a real
  token (attention_mask; every token without one). Padded: [B, S] (or [B, 1] times the labels
  mask); packed: [R, L], each token taking the weight of its slot, 0 at padding."""
  w = example_weights(batch)
  if is_packed(batch):
    seg = batch["segment_ids"]
    per = jnp.where(seg > 0, w[_slot_of_token(batch)], 0.0)
  else:
    per = w[:, None]
  if labels is not None:
    return (labels != IGNORE).astype(jnp.float32) * per
  if "attention_mask" in batch:
    return batch["attention_mask"].astype(jnp.float32) * per
  return jnp.broadcast_to(per, batch["input_ids"].shape).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class ExampleLayout:
  """Where a batch's examples lie in its token arrays x [R, L, ...]: one per row (padded,
  segment_ids None) or one per segment (packed). `num` examples: B rows or E slots.

  sum / max reduce every axis but the example's own tokens -> [num]; spread broadcasts [num]
  values back onto x's tokens; draw samples noise so that a packed example gets exactly the
  noise it would get as row e of a padded batch of the same slots."""

  num: int
  segment_ids: Any = None  # int32 [R, L] or None
  position_ids: Any = None  # int32 [R, L] or None

  @property
  def packed(self) -> bool:
    return self.segment_ids is not None

  def _flat_ids(self):
    # Padding tokens get id -1, which segment_sum / segment_max drop.
    return jnp.where(self.segment_ids > 0, self.segment_ids - 1, -1).reshape(-1)

  def sum(self, x: jax.Array) -> jax.Array:
    """[num]: sum over each example's tokens and all trailing axes of x [R, L, ...]."""
    if not self.packed:
      return jnp.sum(x, axis=tuple(range(1, x.ndim)))
    per_token = jnp.sum(x.reshape(x.shape[:2] + (-1,)), -1).reshape(-1)
    return jax.ops.segment_sum(per_token, self._flat_ids(), num_segments=self.num)

  def max(self, x: jax.Array) -> jax.Array:
    """[num]: max over each example's tokens and trailing axes of x >= 0 (0 for an empty slot)."""
    if not self.packed:
      return jnp.max(x, axis=tuple(range(1, x.ndim)))
    per_token = jnp.max(x.reshape(x.shape[:2] + (-1,)), -1).reshape(-1)
    return jnp.maximum(jax.ops.segment_max(per_token, self._flat_ids(), num_segments=self.num),
                       0.0)

  def spread(self, v: jax.Array, like: jax.Array) -> jax.Array:
    """[num] -> broadcastable to `like` [R, L, ...]: each token gets its example's value (packed
    padding gets slot 0's value; the masks that zero padding still apply)."""
    if not self.packed:
      return v.reshape(v.shape + (1,) * (like.ndim - 1))
    per = v[jnp.maximum(self.segment_ids - 1, 0)]
    return per.reshape(per.shape + (1,) * (like.ndim - 2))

  def draw(self, sample: Callable[[Any, tuple], jax.Array], rng, shape: tuple) -> jax.Array:
    """sample(rng, shape) for a padded batch. Packed ([R, L, ...]): sample(rng, (E, L, ...)), the
    draw of a padded batch of the E slots, read at (slot, position) of each token (0 at padding),
    so an example's noise does not depend on where the packer put it. Costs E / R times the
    memory of one draw."""
    if not self.packed:
      return sample(rng, shape)
    full = sample(rng, (self.num,) + tuple(shape[1:]))
    slot = jnp.maximum(self.segment_ids - 1, 0)
    pos = jnp.clip(self.position_ids, 0, shape[1] - 1)
    picked = full[slot, pos]
    keep = (self.segment_ids > 0).reshape(self.segment_ids.shape + (1,) * (len(shape) - 2))
    return jnp.where(keep, picked, jnp.zeros((), picked.dtype))


def layout_of(batch) -> ExampleLayout:
  """The ExampleLayout of a batch's token arrays (its input_ids / pixel_values rows if padded)."""
  if is_packed(batch):
    return ExampleLayout(int(batch["example_start"].shape[0]), batch["segment_ids"],
                         batch["position_ids"])
  some = next(iter(v for k, v in batch.items() if k in ("input_ids", "pixel_values", "labels")))
  return ExampleLayout(int(some.shape[0]))


def concat_batches(a, b):
  """Batch a stacked on batch b (same keys and trailing shapes) -> one batch: rows of b after a's.

  Padded: every array concatenated on axis 0. Packed: the same, and b's slots renumbered after
  a's under every prefix p ("", "unlabeled/", ...): p+segment_ids of b + E_a at its tokens,
  p+example_start of b + R_a * L (slot e of a stays e, slot e of b becomes E_a + e)."""
  if set(a) != set(b):
    raise ValueError(f"concat_batches needs the same keys, got {sorted(set(a) ^ set(b))} in one")
  out = {}
  for key in a:
    x, y = a[key], b[key]
    prefix, name = key.rsplit("/", 1) if "/" in key else ("", key)
    prefix = prefix + "/" if prefix else ""
    if name == "segment_ids":
      y = jnp.where(y > 0, y + a[prefix + "example_start"].shape[0], y)
    elif name == "example_start" and prefix + "segment_ids" in a:
      y = y + a[prefix + "segment_ids"].size
    out[key] = jnp.concatenate([x, y])
  return out


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


def check_packing(packed: bool, grad_accum_steps: int):
  """Refuses, before any compute, what a step cannot do on packed batches: gradient accumulation
  cuts a batch's rows and its example slots into micro-batches separately, so a micro-batch's
  slots would point at another micro-batch's tokens."""
  if packed and grad_accum_steps > 1:
    raise refuse_packing(
        f"train.grad_accum_steps={grad_accum_steps}",
        "micro-batches split rows and example slots apart",
        f"{PACKING_FIX}, or train.grad_accum_steps=1 (a packed batch already holds more examples "
        "per token of memory)")


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
              guard_in_optimizer: bool = False,
              packed: bool = False):
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
  packed: the batches are packed (data.packing); what cannot run on them is refused here
    (`check_packing`), and a packed batch reaching a step built without it is refused when traced.
  Metrics: loss, loss/<term>, <term>/<metric>, grad_norm (before clipping), lr, nonfinite (0/1),
  skipped_steps (running count); param_norm, update_norm with log_norms.
  """
  check_packing(packed, grad_accum_steps)
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
    check_packing(any(k.rsplit("/", 1)[-1] == "segment_ids" for k in batch), grad_accum_steps)
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
