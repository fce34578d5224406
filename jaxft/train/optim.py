"""Optimizer chains and learning-rate schedules, built over the trainable leaves only.

AdamW (Loshchilov & Hutter 2019) with no weight decay on biases and LayerNorm parameters, global
norm clipping, warmup then linear / cosine / constant / cosine-with-restarts decay, layer-wise
learning-rate decay (Clark et al. 2020: layer l of L gets lr * decay^(L + 1 - l), embeddings l = 0,
the head L + 1) and an optional separate head learning rate. The optimizer sees the flat
`trainable` dict, so frozen parameters have no optimizer state at all.

Learning-rate groups (`learning_rates`): each trainable leaf trains at the peak rate of its group,
one schedule shape for all, as a per-leaf multiplier of the schedule's peak:

  train         pretrained weights trained by full / freeze_bottom    train.learning_rate
  <method>      leaves a PEFT method adds or picks (LoRA A and B,     peft.learning_rate, or the
                biases for bitfit, adapters, ...)                     method's default
  <method>/lora_b   LoRA+ (Hayou et al. 2024): B of LoRA / DoRA       ratio x the method's rate
  head          the task head                                         train.head_learning_rate, or
                                                                      the PEFT rate of a PEFT run,
                                                                      or train.learning_rate
  prune_scores  movement-pruning scores                               prune.score_learning_rate

The schedule's peak (the logged `lr`) is train.learning_rate, except in runs where only PEFT
methods train the backbone, where it is the first method's PEFT rate.
"""

from __future__ import annotations

import logging
import re

import jax
import jax.numpy as jnp
import optax

from jaxft.core.state import Flat
from jaxft.peft.methods import leaf_methods, main_learning_rate, method_learning_rate, parse_method

log = logging.getLogger("jaxft")

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


def make_schedule(train_cfg, total_steps: int, peak: float | None = None) -> optax.Schedule:
  """Warmup (train.warmup_ratio of the steps, linear from 0) then the chosen decay to 0; the peak
  is train.learning_rate unless given."""
  lr = train_cfg.learning_rate if peak is None else peak
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


def lr_multipliers(trainable: Flat, train_cfg, num_layers: int, rates: Flat | None = None,
                   peak: float | None = None) -> Flat:
  """Per-leaf learning-rate multipliers of the schedule's peak: layer-wise decay times the leaf's
  group rate / peak (`rates`: path -> peak rate, from `leaf_learning_rates`; default: the head
  learning rate for the head, train.learning_rate for the rest). An explicit head learning rate
  is not layer-decayed."""
  peak = train_cfg.learning_rate if peak is None else peak
  mults = {}
  for path in trainable:
    m = train_cfg.layer_decay ** (num_layers + 1 - layer_depth(path, num_layers))
    if path.startswith("head/") and train_cfg.head_learning_rate > 0:
      m = train_cfg.head_learning_rate / peak
    elif rates is not None and rates[path] != peak:
      m = m * (rates[path] / peak)
    mults[path] = m
  return mults


def leaf_groups(peft_cfg, paths) -> dict[str, str]:
  """path -> learning-rate group (module docstring): train / head / prune_scores / a PEFT method's
  name / "<method>/lora_b" under LoRA+. peft_cfg None: no PEFT groups (every backbone leaf trains
  at train.learning_rate)."""
  owners = leaf_methods(peft_cfg, paths) if peft_cfg is not None else {}
  plus = peft_cfg is not None and peft_cfg.lora_plus_ratio not in (0, 1)
  groups = {}
  for p in paths:
    method = owners.get(p)
    if p.startswith("head/"):
      groups[p] = "head"
    elif p.startswith(SCORES):
      groups[p] = "prune_scores"
    elif method is None:
      groups[p] = "train"
    elif plus and p.endswith("/lora_b"):
      groups[p] = f"{method}/lora_b"
    else:
      groups[p] = method
  return groups


def _group_rate(group: str, train_cfg, peft_cfg, score_learning_rate: float) -> float:
  if group == "train":
    return float(train_cfg.learning_rate)
  if group == "prune_scores":
    return float(score_learning_rate or train_cfg.learning_rate)
  if group == "head":
    if train_cfg.head_learning_rate > 0:
      return float(train_cfg.head_learning_rate)
    main = main_learning_rate(peft_cfg) if peft_cfg is not None else None
    return float(train_cfg.learning_rate if main is None else main)
  method, _, leaf = group.partition("/")
  rate = method_learning_rate(peft_cfg, method)
  if leaf == "lora_b":
    ratio = float(peft_cfg.lora_plus_ratio)
    if ratio < 0:
      raise ValueError(f"peft.lora_plus_ratio={ratio} must be >= 0 (0 or 1 = LoRA+ off)")
    rate *= ratio
  return float(rate)


def schedule_peak(train_cfg, peft_cfg) -> float:
  """The schedule's peak (what the step logs as `lr`): train.learning_rate, or in a run where only
  PEFT methods train the backbone the first method's rate (jaxft.peft.methods.main_learning_rate)."""
  main = main_learning_rate(peft_cfg) if peft_cfg is not None else None
  return float(train_cfg.learning_rate if main is None else main)


def leaf_learning_rates(train_cfg, peft_cfg, paths, score_learning_rate: float = 0.0):
  """-> (path -> peak rate before layer decay, path -> group)."""
  groups = leaf_groups(peft_cfg, paths)
  rates = {g: _group_rate(g, train_cfg, peft_cfg, score_learning_rate)
           for g in set(groups.values())}
  return {p: rates[g] for p, g in groups.items()}, groups


def learning_rates(train_cfg, peft_cfg, trainable, *, score_learning_rate: float = 0.0) -> dict:
  """{group: peak learning rate} of the groups the trainable leaves (flat dict or paths) fall in,
  before layer decay (module docstring), e.g. {"head": 1e-3, "lora": 1e-3} for the quickstart with
  peft.method=lora. What results.json and the start-of-run log line report."""
  rates, groups = leaf_learning_rates(train_cfg, peft_cfg, list(trainable), score_learning_rate)
  out = {}
  for p, g in sorted(groups.items(), key=lambda kv: kv[1]):
    out[g] = rates[p]
  return out


def describe_learning_rates(train_cfg, peft_cfg, trainable, *,
                            score_learning_rate: float = 0.0) -> str:
  """One line: each group's peak rate and where it comes from."""
  parts = []
  for g, r in learning_rates(train_cfg, peft_cfg, trainable,
                             score_learning_rate=score_learning_rate).items():
    method = g.partition("/")[0]
    if g == "train":
      src = "train.learning_rate"
    elif g == "head":
      src = ("train.head_learning_rate" if train_cfg.head_learning_rate > 0 else
             "the PEFT rate" if peft_cfg is not None and main_learning_rate(peft_cfg) is not None
             else "train.learning_rate")
    elif g == "prune_scores":
      src = "prune.score_learning_rate"
    elif peft_cfg is not None and method in parse_method(peft_cfg.method):
      src = ("peft.learning_rate" if peft_cfg.learning_rate > 0 else
             f"default of {method}, jaxft.peft.methods")
      if g.endswith("/lora_b"):
        src += f", x peft.lora_plus_ratio={peft_cfg.lora_plus_ratio:g} (LoRA+)"
    else:
      src = "?"
    parts.append(f"{g} {r:.3g} ({src})")
  decay = (f"; layer_decay {train_cfg.layer_decay:g} on top" if train_cfg.layer_decay != 1.0
           else "")
  return "learning rates (peak): " + ", ".join(parts) + decay


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
                   clip: bool = True, guarded: bool = False, peft_cfg=None):
  """-> (tx, schedule) for the flat trainable dict.

  peft_cfg (config.peft): PEFT leaves train at their method's rate, LoRA+ gives B its own, and a
  PEFT run's head and schedule peak follow the PEFT rate (module docstring; `learning_rates`
  reports the groups and make_optimizer logs them). None: every leaf but the head and the pruning
  scores trains at train.learning_rate.

  Movement-pruning scores ("prune_scores/...") get their own learning rate (score_learning_rate,
  following the same warmup/decay shape) and no weight decay, as in Sanh et al. 2020.
  schedule=plateau appends a reduce-on-plateau scale (jaxft.train.averaging) the loop lowers.
  clip=False leaves train.grad_clip out of the chain, for a step that clips with the gradient
  norm it computes anyway (jaxft.objectives.base.make_step's grad_clip). guarded=True: AdamW
  takes the step's skip decision (`adamw`), for make_step(..., guard_in_optimizer=True).
  """
  peak = schedule_peak(train_cfg, peft_cfg) if peft_cfg is not None else train_cfg.learning_rate
  schedule = make_schedule(train_cfg, total_steps, peak)
  rates, _ = leaf_learning_rates(train_cfg, peft_cfg, list(trainable), score_learning_rate)
  if peft_cfg is not None:
    log.info(describe_learning_rates(train_cfg, peft_cfg, trainable,
                                     score_learning_rate=score_learning_rate))
  decay_mask = {k: decays(k) and not k.startswith(SCORES) for k in trainable}
  parts = []
  if clip and train_cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(train_cfg.grad_clip))
  parts.append(adamw(schedule, b1=train_cfg.adam_b1, b2=train_cfg.adam_b2,
                     eps=train_cfg.adam_eps, weight_decay=train_cfg.weight_decay,
                     mask=decay_mask, guarded=guarded))
  mults = lr_multipliers(trainable, train_cfg, num_layers, rates, peak)
  if score_learning_rate > 0:
    mults.update({k: score_learning_rate / peak for k in trainable if k.startswith(SCORES)})
  if any(m != 1.0 for m in mults.values()):
    parts.append(scale_by_multipliers(mults))
  if train_cfg.schedule == "plateau":
    from jaxft.train.averaging import plateau_scale
    parts.append(plateau_scale(plateau_mode))
  return optax.chain(*parts), schedule
