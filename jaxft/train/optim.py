"""Optimizer chains and learning-rate schedules, built over the trainable leaves only.

AdamW (Loshchilov & Hutter 2019) with no weight decay on biases and LayerNorm parameters, global
norm clipping, warmup then linear / cosine / constant / cosine-with-restarts decay, layer-wise
learning-rate decay (Clark et al. 2020: layer l of L gets lr * decay^(L + 1 - l), embeddings l = 0,
the head L + 1) and an optional separate head learning rate. The optimizer sees the flat
`trainable` dict, so frozen parameters have no optimizer state at all.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax

from jaxft.core.state import Flat

_NO_DECAY = re.compile(r"(^|/)(bias|scale|LayerNorm|layer_norm|layernorm|ln_?\w*)(/|$)|"
                       r"(LayerNorm|layer_norm|layernorm|_ln|norm)[^/]*/(scale|bias)$")
_LAYER = re.compile(r"(?:^|/)(?:layer|layers)_(\d+)(?:/|$)")


def decays(path: str) -> bool:
  """Whether weight decay applies: not to biases, LayerNorm scales/biases, or 1-D vectors of PEFT."""
  if path.endswith("/bias") or path.endswith("/scale"):
    return False
  return not _NO_DECAY.search(path)


def layer_depth(path: str, num_layers: int) -> int:
  """0 for embeddings, l + 1 for encoder layer l, num_layers + 1 for the head and pooler."""
  if path.startswith("head/") or "/pooler/" in path or path.startswith("pooler/"):
    return num_layers + 1
  m = _LAYER.search(path)
  if m:
    return int(m.group(1)) + 1
  if "embed" in path:
    return 0
  return num_layers + 1


def make_schedule(train_cfg, total_steps: int) -> optax.Schedule:
  """Warmup (train.warmup_ratio of the steps, linear from 0) then the chosen decay to 0."""
  lr = train_cfg.learning_rate
  warmup = int(round(train_cfg.warmup_ratio * total_steps))
  rest = max(total_steps - warmup, 1)
  kind = train_cfg.schedule
  if kind == "linear":
    decay = optax.linear_schedule(lr, 0.0, rest)
  elif kind == "cosine":
    decay = optax.cosine_decay_schedule(lr, rest)
  elif kind in ("constant", "plateau"):
    decay = optax.constant_schedule(lr)
  elif kind == "cosine_restarts":
    cycles = max(int(train_cfg.restarts), 1)
    period = max(rest // cycles, 1)
    decay = optax.join_schedules([optax.cosine_decay_schedule(lr, period)] * cycles,
                                 [period * (i + 1) for i in range(cycles - 1)])
  else:
    raise ValueError(f"unknown train.schedule {kind!r}; known: linear, cosine, constant, "
                     "cosine_restarts, plateau")
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def lr_multipliers(trainable: Flat, train_cfg, num_layers: int) -> Flat:
  """Per-leaf learning-rate multipliers from layer-wise decay and the head learning rate."""
  mults = {}
  for path in trainable:
    m = train_cfg.layer_decay ** (num_layers + 1 - layer_depth(path, num_layers))
    if path.startswith("head/") and train_cfg.head_learning_rate > 0:
      m = train_cfg.head_learning_rate / train_cfg.learning_rate
    mults[path] = m
  return mults


def scale_by_multipliers(mults: Flat) -> optax.GradientTransformation:
  """Multiplies each leaf's update by a constant (layer-wise lr decay); stateless."""

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    return {k: u * mults[k] for k, u in updates.items()}, state

  return optax.GradientTransformation(init_fn, update_fn)


SCORES = "prune_scores/"


def _keep(apply_update, new, old):
  return jax.tree_util.tree_map(lambda n, o: jnp.where(apply_update, n, o), new, old)


def guarded_scale_by_adam(b1: float, b2: float, eps: float) -> optax.GradientTransformationExtraArgs:
  """optax.scale_by_adam whose update takes `apply_update` (bool[]): where it is False the count
  and moments stay bitwise as they were. The update is computed from the kept moments, so the
  program reads each moment once and writes it in place (selecting around a plain Adam makes XLA
  copy every moment first: the update would read the old one after its in-place overwrite).
  Where apply_update is True the numbers are optax.scale_by_adam's, bitwise."""
  inner = optax.scale_by_adam(b1, b2, eps)

  def update_fn(updates, state, params=None, *, apply_update=True, **extra):
    del params, extra
    _, new = inner.update(updates, state)
    new = optax.ScaleByAdamState(count=_keep(apply_update, new.count, state.count),
                                 mu=_keep(apply_update, new.mu, state.mu),
                                 nu=_keep(apply_update, new.nu, state.nu))
    mu_hat = optax.tree.bias_correction(new.mu, b1, new.count)
    nu_hat = optax.tree.bias_correction(new.nu, b2, new.count)
    out = jax.tree_util.tree_map(lambda m, v: m / (jnp.sqrt(v + 0.0) + eps), mu_hat, nu_hat)
    return out, new

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def guarded_scale_by_learning_rate(schedule) -> optax.GradientTransformationExtraArgs:
  """optax.scale_by_learning_rate(schedule) whose step count does not advance where
  `apply_update` is False."""
  inner = optax.scale_by_learning_rate(schedule)

  def update_fn(updates, state, params=None, *, apply_update=True, **extra):
    del extra
    out, new = inner.update(updates, state, params)
    return out, _keep(apply_update, new, state)

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def adamw(schedule, *, b1: float, b2: float, eps: float, weight_decay: float, mask,
          guarded: bool = False) -> optax.GradientTransformation:
  """optax.adamw (Loshchilov & Hutter 2019), or with guarded=True the same chain whose stateful
  pieces take `apply_update` (the step's skip of non-finite or spiking updates; the caller
  keeps the params where it is False). Same state structure either way."""
  if not guarded:
    return optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask)
  return optax.chain(guarded_scale_by_adam(b1, b2, eps),
                     optax.add_decayed_weights(weight_decay, mask),
                     guarded_scale_by_learning_rate(schedule))


def make_optimizer(train_cfg, trainable: Flat, num_layers: int, total_steps: int, *,
                   score_learning_rate: float = 0.0, plateau_mode: str = "max",
                   clip: bool = True, guarded: bool = False):
  """-> (tx, schedule) for the flat trainable dict.

  Movement-pruning scores ("prune_scores/...") get their own learning rate (score_learning_rate,
  following the same warmup/decay shape) and no weight decay, as in Sanh et al. 2020.
  schedule=plateau appends a reduce-on-plateau scale (jaxft.train.averaging) the loop lowers.
  clip=False leaves train.grad_clip out of the chain, for a step that clips with the gradient
  norm it computes anyway (jaxft.objectives.base.make_step's grad_clip). guarded=True: AdamW
  takes the step's skip decision (`adamw`), for make_step(..., guard_in_optimizer=True).
  """
  schedule = make_schedule(train_cfg, total_steps)
  decay_mask = {k: decays(k) and not k.startswith(SCORES) for k in trainable}
  parts = []
  if clip and train_cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(train_cfg.grad_clip))
  parts.append(adamw(schedule, b1=train_cfg.adam_b1, b2=train_cfg.adam_b2,
                     eps=train_cfg.adam_eps, weight_decay=train_cfg.weight_decay,
                     mask=decay_mask, guarded=guarded))
  mults = lr_multipliers(trainable, train_cfg, num_layers)
  if score_learning_rate > 0:
    mults.update({k: score_learning_rate / train_cfg.learning_rate for k in trainable
                  if k.startswith(SCORES)})
  if any(m != 1.0 for m in mults.values()):
    parts.append(scale_by_multipliers(mults))
  if train_cfg.schedule == "plateau":
    from jaxft.train.averaging import plateau_scale
    parts.append(plateau_scale(plateau_mode))
  return optax.chain(*parts), schedule
