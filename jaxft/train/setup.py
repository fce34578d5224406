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
from jaxft.core.state import TrainState
from jaxft.objectives import registry as objectives
from jaxft.train import mesh as mesh_lib
from jaxft.train.build import build

log = logging.getLogger("jaxft")


@dataclasses.dataclass
class Setup:
  """A run's loaded pieces around the step the builder made (`built`: jaxft.train.build.Built)."""

  config: Any
  mesh: Any
  data: Any  # jaxft.data.pipeline.DataBundle
  model: Any  # jaxft.models.Model
  peft_spec: Any
  built: Any  # jaxft.train.build.Built
  state: TrainState  # the initial state, sharded over the mesh
  state_shardings: Any
  step_fn: Callable  # jitted built.step(state, batch, rng) -> (state, metrics)
  total_steps: int
  trace_count: list  # [n]: how many times the step was traced (compiled)
  quant_spec: Any = None
  # A recipe's own evaluation (several tasks' metrics) and summary of the eval history (e.g. a
  # continual run's forgetting) for results.json; None: the task's Evaluator, no summary.
  evaluator: Any = None
  summarize: Callable[[list], dict] | None = None

  @property
  def counts(self) -> dict:
    return self.built.counts

  @property
  def apply_fn(self) -> Callable:
    """The forward training and eval use (fake-quantized under QAT)."""
    return self.built.apply_fn

  @property
  def best_from_step(self) -> int:
    """Evaluations before this step cannot be the best checkpoint."""
    return self.built.eval_from_step

  def checkpointable(self, state: TrainState) -> TrainState:
    """What goes into checkpoints: everything but frozen params, which reload from the base model."""
    return state.replace(frozen={})

  def from_checkpointable(self, saved: TrainState) -> TrainState:
    return saved.replace(frozen=self.state.frozen)

  def eval_params(self, trainable, frozen, extras):
    """The model's nested params as evaluated and exported (traceable): see Built.eval_params."""
    return self.built.eval_params(trainable, frozen, extras)

  def after_eval(self, state: TrainState, value: float) -> TrainState:
    """Host-side hooks of the run's parts after an evaluation (reduce-on-plateau)."""
    return state if self.built.after_eval is None else self.built.after_eval(state, value)


def load_tokenizer(name: str):
  from transformers import AutoTokenizer
  path = assets.resolve_model(name)
  try:
    return AutoTokenizer.from_pretrained(path)
  except OSError as e:
    raise OSError(f"could not load a tokenizer for model {name!r} ({e}). Offline? Use a local "
                  "Hugging Face directory or an asset name (jaxft assets list).") from e


def _head_for(kind: str, head: str) -> str:
  if head:
    return head
  return {"classification": "sequence_classification", "regression": "regression",
          "token_classification": "token_classification"}[kind]


def total_steps_of(train_cfg, steps_per_epoch: int) -> int:
  if train_cfg.num_steps > 0:
    return int(train_cfg.num_steps)
  return max(int(math.ceil(train_cfg.num_epochs * steps_per_epoch)), 1)


def model_kwargs(config, info, spec, tokenizer) -> dict:
  m = config.model
  return dict(
      head=_head_for(info.kind, m.head), num_labels=info.num_labels, dtype=m.dtype,
      pooling=m.pooling or None, peft=spec, remat=m.remat, attention_impl=m.attention_impl or None,
      hidden_dropout=None if m.hidden_dropout < 0 else m.hidden_dropout,
      attention_dropout=None if m.attention_dropout < 0 else m.attention_dropout,
      classifier_dropout=None if m.classifier_dropout < 0 else m.classifier_dropout,
      id2label=dict(enumerate(info.label_names)) if info.label_names else None,
      tokenizer=tokenizer)


def _strong_view(config, objective, data, tokenizer):
  """The train batches, with a strongly augmented copy of the unlabeled rows when the objective
  reads one (`Part.strong_view`: FixMatch, UDA, FlexMatch, ...)."""
  from jaxft.data.views import StrongView
  if not objective.strong_view or not config.data.strong_augment:
    return data.train
  special = [i for i in (tokenizer.all_special_ids or []) if i is not None]
  return StrongView(data.train, config.data.strong_augment, seed=config.seed, special_ids=special,
                    pad_id=tokenizer.pad_token_id or 0, replace_id=tokenizer.mask_token_id)


def packing_blocker(config, peft_spec) -> str | None:
  """Why this run's batches cannot be packed (data.packing), or None when they can."""
  if peft_spec.prompt_length > 0:
    return ("prompt tuning inserts its vectors after a row's first token, which a packed row "
            "shares between examples")
  if config.train.grad_accum_steps > 1:
    return ("gradient accumulation splits a batch's rows into micro-batches, and packed rows are "
            "not laid out by micro-batch")
  return None


def use_packing(config, peft_spec) -> bool:
  """data.packing, unless the run cannot pack: then length buckets, said in the log."""
  if not config.data.packing:
    return False
  why = packing_blocker(config, peft_spec)
  if why:
    log.warning("data.packing: %s; this run uses length buckets "
                "(--config.data.packing=false says so explicitly)", why)
    return False
  return True


def check_max_length(max_length: int, hf_config) -> None:
  """Position ids past the embedding table would be clamped silently by the gather: refuse them."""
  n = getattr(hf_config, "max_position_embeddings", None)
  if n is None:
    return
  if getattr(hf_config, "model_type", "") in ("roberta", "mpnet", "xlm-roberta", "camembert"):
    n -= 2  # positions start after the padding index
  if max_length > n:
    raise ValueError(f"data.max_length={max_length} exceeds the model's {n} positions. Fix: "
                     f"--config.data.max_length={n} or less.")


RNG_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")


def train_key(config) -> jax.Array:
  """The key every training step's dropout and noise derive from (seed, train.rng_impl).
  threefry2x32 is JAX's default and stays jaxft's: its stream is the same on every backend and
  JAX version. rbg / unsafe_rbg draw with XLA's RngBitGenerator: a different, equally seeded
  stream that jax.random documents as not reproducible across backends or versions. In the
  compiled BERT-base step (seq 128 x batch 4, CPU) they save 2.9% of the bytes accessed and 3% /
  8% of the ops (benchmarks/README.md); benchmarks/gpu_check.sh times the rbg step on a GPU."""
  impl = config.train.rng_impl
  if impl not in RNG_IMPLS:
    raise ValueError(f"train.rng_impl={impl!r} is not a JAX PRNG implementation jaxft supports; "
                     f"use one of {', '.join(RNG_IMPLS)}")
  return jax.random.key(config.seed, impl=impl)


def check_and_mesh(config, devices=None):
  """The checks that need no data or model (rng, compression options, batch sizes over the
  devices) -> (mesh, quantization spec). Every run's setup starts here."""
  from jaxft.train import compress
  train_key(config)  # a bad train.rng_impl fails here, before data and model load
  qspec = compress.check(config)
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  mesh_lib.check_batch_divides(config.train.batch_size, mesh)
  mesh_lib.check_batch_divides(config.train.eval_batch_size, mesh, "train.eval_batch_size")
  if config.train.batch_size % config.train.grad_accum_steps:
    raise ValueError(f"train.batch_size={config.train.batch_size} is not a multiple of "
                     f"train.grad_accum_steps={config.train.grad_accum_steps}")
  return mesh, qspec


def build_setup(config, devices=None) -> Setup:
  from jaxft import peft
  from jaxft.data import pipeline
  from jaxft.train import compress

  mesh, qspec = check_and_mesh(config, devices)

  objective_names = objectives.names()
  if config.objective.name not in objective_names:
    objectives.build(config.objective, None)  # raises with the known names
  tokenizer = load_tokenizer(config.model.name)
  spec = peft.spec_from_config(config.peft)
  data = pipeline.build(config.data, tokenizer, batch_size=config.train.batch_size,
                        eval_batch_size=config.train.eval_batch_size, seed=config.seed,
                        num_shards=mesh_lib.num_batch_shards(mesh),
                        unlabeled_ratio=config.data.unlabeled_ratio,
                        packing=use_packing(config, spec))
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
    data = dataclasses.replace(data, train=_strong_view(config, objective, data, tokenizer))

  kwargs = model_kwargs(config, info, spec, tokenizer)
  teacher = compress.load_teacher(config, kwargs["head"], info, tokenizer)
  model = compress.load_model(config, teacher, **kwargs)
  check_max_length(config.data.max_length, model.config)

  total_steps = total_steps_of(config.train, data.train.steps_per_epoch)
  data, cached = compress.with_teacher_logits(teacher, config, data,
                                              lambda b: mesh_lib.put_batch(b, mesh),
                                              mesh_lib.num_batch_shards(mesh))
  built = build(config, model, info, total_steps=total_steps, teacher=teacher,
                teacher_logits_cached=cached)
  log.info("step: %s", " + ".join(built.part_names))
  for part in built.parts:
    if part.note:
      log.info("%s: %s", part.name, part.note)
  state, shardings = mesh_lib.shard_state(built.state, mesh)
  step = built.step

  trace_count = [0]

  def counted_step(state, batch, rng):
    trace_count[0] += 1  # runs only while tracing
    return step(state, batch, rng)

  step_fn = mesh_lib.jit_step(counted_step, mesh, shardings)
  return Setup(config=config, mesh=mesh, data=data, model=model, peft_spec=spec, built=built,
               state=state, state_shardings=shardings, step_fn=step_fn, total_steps=total_steps,
               trace_count=trace_count, quant_spec=qspec)
