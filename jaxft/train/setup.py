"""Builds everything a run needs from its config, validating input before any compile.

Order matters for the promise "bad input fails before long compute": tokenizer and data first
(missing columns, bad labels, empty texts, a batch that does not divide over devices), then the
model (checkpoint shape mismatches), then the PEFT partition (rules that match nothing), and only
then the jitted step.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable

import jax

from jaxft import assets
from jaxft.objectives import registry as objectives
from jaxft.objectives.base import make_step
from jaxft.train import mesh as mesh_lib
from jaxft.train.optim import make_optimizer
from jaxft.core.state import TrainState, flatten, unflatten

log = logging.getLogger("jaxft")


@dataclasses.dataclass
class Setup:
  config: Any
  mesh: Any
  data: Any  # jaxft.data.pipeline.DataBundle
  model: Any  # jaxft.models.Model
  peft_spec: Any
  counts: dict
  state: TrainState
  state_shardings: Any
  step_fn: Callable  # jitted step(state, batch, rng) -> (state, metrics)
  total_steps: int
  trace_count: list  # [n]: how many times the step was traced (compiled)
  apply_fn: Callable = None  # the forward training and eval use (fake-quantized under QAT)
  quant_spec: Any = None
  # Evaluations before this step cannot be the best checkpoint: a pruning run's model is only the
  # one asked for once its schedule has reached the final sparsity.
  best_from_step: int = 0

  def checkpointable(self, state: TrainState) -> TrainState:
    """What goes into checkpoints: everything but frozen params, which reload from the base model."""
    return state.replace(frozen={})

  def from_checkpointable(self, saved: TrainState) -> TrainState:
    return saved.replace(frozen=self.state.frozen)

  def eval_params(self, trainable, frozen, extras):
    """The model's nested params as evaluated and exported (traceable): the EMA / SWA average when
    train.eval_with asks for it, pruning masks applied, training-only leaves (distillation
    projections, movement scores) dropped."""
    from jaxft.objectives.prune import apply_masks
    which = self.config.train.eval_with
    if which in ("ema", "swa"):
      trainable = {k: extras[which][k].astype(v.dtype) for k, v in trainable.items()}
    flat = {k: v for k, v in {**frozen, **trainable}.items()
            if not k.startswith(("distill_proj/", "prune_scores/"))}
    if "masks" in extras:
      flat = apply_masks(flat, extras["masks"])
    return unflatten(flat)


def load_tokenizer(name: str):
  from transformers import AutoTokenizer
  path = assets.resolve_model(name)
  try:
    return AutoTokenizer.from_pretrained(path)
  except OSError as e:
    raise OSError(f"could not load a tokenizer for model {name!r} ({e}). Offline? Use a local "
                  "Hugging Face directory or an asset name (jaxft assets list).") from e


def _num_layers(hf_config) -> int:
  for attr in ("num_hidden_layers", "n_layers", "num_layers"):
    if hasattr(hf_config, attr):
      return int(getattr(hf_config, attr))
  raise AttributeError(f"cannot tell the number of layers of {type(hf_config).__name__}")


def _head_for(kind: str, head: str) -> str:
  if head:
    return head
  return {"classification": "sequence_classification", "regression": "regression",
          "token_classification": "token_classification"}[kind]


def total_steps_of(train_cfg, steps_per_epoch: int) -> int:
  if train_cfg.num_steps > 0:
    return int(train_cfg.num_steps)
  return max(int(math.ceil(train_cfg.num_epochs * steps_per_epoch)), 1)


def _model_kwargs(config, info, spec, tokenizer) -> dict:
  m = config.model
  return dict(
      head=_head_for(info.kind, m.head), num_labels=info.num_labels, dtype=m.dtype,
      pooling=m.pooling or None, peft=spec, remat=m.remat, attention_impl=m.attention_impl or None,
      hidden_dropout=None if m.hidden_dropout < 0 else m.hidden_dropout,
      attention_dropout=None if m.attention_dropout < 0 else m.attention_dropout,
      classifier_dropout=None if m.classifier_dropout < 0 else m.classifier_dropout,
      id2label=dict(enumerate(info.label_names)) if info.label_names else None,
      tokenizer=tokenizer)


def _strong_view(config, objective_name: str, data, tokenizer):
  """FixMatch / UDA read a strongly augmented copy of the unlabeled rows."""
  from jaxft.data.views import StrongView
  if objective_name not in ("fixmatch", "uda") or not config.data.strong_augment:
    return data.train
  special = [i for i in (tokenizer.all_special_ids or []) if i is not None]
  return StrongView(data.train, config.data.strong_augment, seed=config.seed, special_ids=special,
                    pad_id=tokenizer.pad_token_id or 0, replace_id=tokenizer.mask_token_id)


def _averaging(train_cfg, trainable):
  """-> (extras, update_extras) for EMA / SWA of the trainable params (train.ema_decay, swa_start)."""
  from jaxft.train import averaging
  extras, fns = {}, []
  if train_cfg.ema_decay > 0:
    extras.update(averaging.init_ema(trainable))
    fns.append(averaging.ema_update(float(train_cfg.ema_decay)))
  if train_cfg.swa_start >= 0:
    extras.update(averaging.init_swa(trainable))
    fns.append(averaging.swa_update(int(train_cfg.swa_start), int(train_cfg.swa_every)))
  if train_cfg.eval_with not in ("params", "ema", "swa"):
    raise ValueError(f"train.eval_with={train_cfg.eval_with!r}: use params, ema or swa")
  if train_cfg.eval_with == "ema" and not train_cfg.ema_decay > 0:
    raise ValueError("train.eval_with=ema needs train.ema_decay > 0 (e.g. 0.999)")
  if train_cfg.eval_with == "swa" and train_cfg.swa_start < 0:
    raise ValueError("train.eval_with=swa needs train.swa_start >= 0")
  return extras, fns


def _check_max_length(max_length: int, hf_config) -> None:
  """Position ids past the embedding table would be clamped silently by the gather: refuse them."""
  n = getattr(hf_config, "max_position_embeddings", None)
  if n is None:
    return
  if getattr(hf_config, "model_type", "") in ("roberta", "mpnet", "xlm-roberta"):
    n -= 2  # positions start after the padding index
  if max_length > n:
    raise ValueError(f"data.max_length={max_length} exceeds the model's {n} positions. Fix: "
                     f"--config.data.max_length={n} or less.")


RNG_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")


def train_key(config) -> jax.Array:
  """The key every training step's dropout and noise derive from (seed, train.rng_impl).
  threefry2x32 is JAX's default; rbg / unsafe_rbg draw with XLA's RngBitGenerator, which JAX
  offers as the cheaper generator on accelerators (not yet timed here) for the hundreds of MB of
  dropout bits a BERT-base step draws (benchmarks/diag/dot_census.py); they give a different,
  equally seeded, random stream."""
  impl = config.train.rng_impl
  if impl not in RNG_IMPLS:
    raise ValueError(f"train.rng_impl={impl!r} is not a JAX PRNG implementation jaxft supports; "
                     f"use one of {', '.join(RNG_IMPLS)}")
  return jax.random.key(config.seed, impl=impl)


def build_setup(config, devices=None) -> Setup:
  from jaxft import peft
  from jaxft.data import pipeline
  from jaxft.models import from_pretrained
  from jaxft.objectives import prune as prune_lib
  from jaxft.quant import qat
  from jaxft.train import averaging, compress, spike

  train_key(config)  # a bad train.rng_impl fails here, before data and model load
  keep = compress.parse_layers(config.model.keep_layers, "model.keep_layers")
  if keep and config.distill.student_layers:
    raise ValueError("model.keep_layers and distill.student_layers both pick layers; a student "
                     "built from teacher layers ignores model.name: set only "
                     "distill.student_layers")
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  mesh_lib.check_batch_divides(config.train.batch_size, mesh)
  mesh_lib.check_batch_divides(config.train.eval_batch_size, mesh, "train.eval_batch_size")
  if config.train.batch_size % config.train.grad_accum_steps:
    raise ValueError(f"train.batch_size={config.train.batch_size} is not a multiple of "
                     f"train.grad_accum_steps={config.train.grad_accum_steps}")
  qspec = compress.quant_spec(config.quant)
  if config.prune.method and config.prune.method not in ("magnitude", "movement", "soft_movement"):
    raise ValueError(f"unknown prune.method {config.prune.method!r}; known: magnitude, movement, "
                     "soft_movement (or '' for none)")

  objective_names = objectives.names()
  if config.objective.name not in objective_names:
    objectives.build(config.objective, None)  # raises with the known names
  tokenizer = load_tokenizer(config.model.name)
  data = pipeline.build(config.data, tokenizer, batch_size=config.train.batch_size,
                        eval_batch_size=config.train.eval_batch_size, seed=config.seed,
                        num_shards=mesh_lib.num_batch_shards(mesh),
                        unlabeled_ratio=config.data.unlabeled_ratio)
  for note in data.notes:
    log.info("data: %s", note)
  info = data.info
  objective = objectives.build(config.objective, info)
  if objective.unlabeled and not config.data.labeled_per_class:
    raise ValueError(f"objective {config.objective.name!r} needs unlabeled data: set "
                     "data.labeled_per_class > 0 (and data.unlabeled_ratio, e.g. 3)")
  if objective.unlabeled and not config.data.unlabeled_ratio:
    raise ValueError(f"objective {config.objective.name!r} needs unlabeled rows in each batch: "
                     "set data.unlabeled_ratio > 0 (e.g. 3)")
  if objective.unlabeled:
    data = dataclasses.replace(data, train=_strong_view(config, config.objective.name, data,
                                                        tokenizer))

  spec = peft.spec_from_config(config.peft)
  kwargs = _model_kwargs(config, info, spec, tokenizer)
  teacher = None
  if config.distill.teacher:
    teacher = compress.load_teacher(config, kwargs["head"], info, tokenizer)
  if teacher is not None and teacher.layers:
    model = compress.student_from_teacher(teacher, **kwargs)
    log.info("student: teacher layers %s", teacher.layers)
  else:
    model = from_pretrained(assets.resolve_model(config.model.name), **kwargs)
    if keep:  # a shallower model from the checkpoint's own layers (same rule as a student's)
      try:
        model = compress.student_from_teacher(compress.Teacher(model, keep), **kwargs)
      except ValueError as e:
        raise ValueError(f"model.keep_layers={config.model.keep_layers!r} does not fit "
                         f"{config.model.name}: {e}") from None
      log.info("model: layers %s of %s", keep, config.model.name)
  _check_max_length(config.data.max_length, model.config)
  num_layers = _num_layers(model.config)
  flat = flatten(model.params)
  labels = peft.partition(config.peft, flat, num_layers)
  trainable = {k: v for k, v in flat.items() if labels[k] == "trainable"}
  frozen = {k: v for k, v in flat.items() if labels[k] != "trainable"}
  counts = peft.count(flat, labels)

  total_steps = total_steps_of(config.train, data.train.steps_per_epoch)
  main_metric = config.train.early_stopping_metric or info.main_metric
  apply_fn = model.apply
  if config.quant.method == "qat_int8":
    apply_fn = qat.qat_apply(model.apply, qspec)
  terms = dict(objective.terms)
  extras = objective.init_extras(trainable, frozen) if objective.init_extras else {}
  update_fns = [objective.update_extras]

  if teacher is not None:
    data, distill = compress.distillation(teacher, config, data, model, info,
                                          lambda b: mesh_lib.put_batch(b, mesh))
    terms.pop("sup", None)  # distillation's alpha * CE replaces the plain supervised term
    terms["distill"] = distill.term
    trainable.update(distill.trainable)
    extras.update(distill.extras)

  prune_kwargs, best_from_step = None, 0
  if config.prune.method:
    p = config.prune
    schedule = compress.prune_schedule(p, total_steps)
    log.info(compress.steps_note(total_steps, schedule))
    trainable, prune_extras = prune_lib.init_pruning(
        trainable, frozen, p.method, schedule=schedule, scope=p.scope, score_init=p.score_init,
        soft_threshold=p.soft_threshold)
    extras.update(prune_extras)
    prune_kwargs = dict(method=p.method, schedule=schedule, scope=p.scope,
                        soft_threshold=p.soft_threshold, l1_weight=p.l1_weight)
    best_from_step = min(schedule.end_step + 1, total_steps)

  guard = spike.from_config(config.train)
  if guard is not None:
    extras.update(guard.init())
  avg_extras, avg_fns = _averaging(config.train, trainable)
  extras.update(avg_extras)
  update_extras = averaging.chain_update_extras(*update_fns, *avg_fns)

  tx, lr_schedule = make_optimizer(
      config.train, trainable, num_layers, total_steps,
      score_learning_rate=config.prune.score_learning_rate if config.prune.method else 0.0,
      plateau_mode="min" if main_metric == "loss" else "max")
  state = TrainState.create(trainable, frozen, tx, extras)
  state, shardings = mesh_lib.shard_state(state, mesh)

  step_kwargs = dict(lr_schedule=lr_schedule, grad_accum_steps=config.train.grad_accum_steps,
                     nan_policy=config.train.nan_policy, update_extras=update_extras,
                     spike_guard=guard)
  if prune_kwargs is not None:
    step = prune_lib.make_prune_step(apply_fn, terms, tx, **prune_kwargs, **step_kwargs)
  else:
    step = make_step(apply_fn, terms, tx, **step_kwargs)

  trace_count = [0]

  def counted_step(state, batch, rng):
    trace_count[0] += 1  # runs only while tracing
    return step(state, batch, rng)

  step_fn = mesh_lib.jit_step(counted_step, mesh, shardings)
  return Setup(config=config, mesh=mesh, data=data, model=model, peft_spec=spec,
               counts=counts, state=state, state_shardings=shardings, step_fn=step_fn,
               total_steps=total_steps, trace_count=trace_count, apply_fn=apply_fn,
               quant_spec=qspec, best_from_step=best_from_step)
