"""Experiment configs: `base_config()` (every key jaxft knows), loading experiment files, overrides.

An experiment file in experiments/ defines `get_config(arg: str | None) -> ConfigDict`, starting
from `base_config()` and setting what it needs. `load(spec, overrides)` imports it
(`experiments/x.py:arg`), applies `--config.a.b=value` overrides (a typo fails and names the closest
key), type-checks them, and returns the config locked: no code may add keys afterwards.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import pathlib
from typing import Any, Iterable

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  """All options with their defaults. Experiments change values, never add keys."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.experiment = ""  # filled by load(): the experiment file and arg, for the workdir record

  c.model = ml_collections.ConfigDict(dict(
      name="minilm-l6",  # local HF dir, hub id, or an asset name (jaxft assets list)
      head="",  # "" = from the task kind; or sequence_classification / regression / token_classification
      pooling="",  # "" = family default (pooler/cls); or pooler / cls / mean
      dtype="float32",  # compute dtype: float32 or bfloat16 (params stay float32)
      remat=False,
      keep_layers="",  # e.g. "0,2,4": a shallower model of only these layers of the checkpoint
      attention_impl="",  # "" = auto (cuDNN flash on GPU), xla, cudnn
      hidden_dropout=-1.0,  # < 0: keep the checkpoint's value
      attention_dropout=-1.0,
      classifier_dropout=-1.0,
  ))

  c.data = ml_collections.ConfigDict(dict(
      name="mr",
      data_dir="",  # "" = the task's default place: packaged data, else $JAXFT_DATA/<folder> or
      # ../shared/data/<folder> (jaxft.data.tasks.data_root; GLUE: glue), else the hub
      train_file="",
      validation_file="",
      test_file="",
      text_columns="",  # one or two column names, comma separated
      label_column="",
      task_kind="",  # for data.name=local: classification / regression / token_classification
      num_labels=0,  # 0 = infer from the data
      max_length=128,
      train_split="train",
      eval_split="validation",
      max_train_examples=0,  # 0 = all
      max_eval_examples=0,
      packing=False,  # True: several whole examples per row (jaxft.data.packing); False: buckets
      bucket_boundaries="",  # "" = powers of two up to max_length (data.packing=False)
      labeled_per_class=0,  # > 0: semi-supervised, k labels per class, rest unlabeled
      unlabeled_ratio=0,  # mu: unlabeled rows per labeled row in a batch
      strong_augment="token_strong",  # FixMatch / UDA strong view of unlabeled rows (token policy)
      unlabeled_label_metrics=False,  # log pseudo-label accuracy from the pool's true labels
      pseudo_labels="",  # a jaxft.data.pseudo_labels file: teacher labels for unlabeled pool rows
      cache_dir="",
  ))

  c.train = ml_collections.ConfigDict(dict(
      batch_size=32,
      eval_batch_size=64,
      num_epochs=3.0,
      num_steps=0,  # > 0 overrides num_epochs
      learning_rate=2e-5,
      head_learning_rate=0.0,  # > 0: a separate learning rate for the task head
      weight_decay=0.01,
      warmup_ratio=0.1,
      schedule="linear",  # linear / cosine / constant / cosine_restarts / plateau
      restarts=1,  # cycles for cosine_restarts
      layer_decay=1.0,  # layer-wise lr decay factor (< 1 lowers lower layers' lr)
      grad_clip=1.0,  # global-norm clipping; 0 = off
      grad_accum_steps=1,
      adam_b1=0.9,
      adam_b2=0.999,
      adam_eps=1e-8,
      rng_impl="threefry2x32",  # dropout/noise key: threefry2x32, rbg or unsafe_rbg
      nan_policy="skip",  # skip / error / none
      log_norms=False,  # True: param_norm and update_norm every step (else param_norm at log steps)
      spike_factor=0.0,  # > 0 (e.g. 10): skip updates whose grad norm > factor x recent median
      spike_window=100,  # recent grad norms the spike guard keeps
      spike_min_history=20,  # norms seen before the spike guard acts
      log_every=50,
      eval_every=0,  # 0 = at the end of every epoch
      checkpoint_every=0,  # 0 = at every eval
      keep_checkpoints=2,
      early_stopping_metric="",  # "" = the task's main metric
      early_stopping_patience=0,  # evals without improvement before stopping; 0 = never stop
      progress=True,
      ema_decay=0.0,  # > 0: keep an EMA of the trainable params (e.g. 0.999)
      swa_start=-1,  # >= 0: SWA running mean of the params from this step ...
      swa_every=1,  # ... every this many steps
      eval_with="params",  # params / ema / swa: which weights eval (and results) use
      plateau_factor=0.5,  # schedule=plateau: lr scale multiplied by this ...
      plateau_patience=2,  # ... after this many evals without improvement
  ))

  c.peft = ml_collections.ConfigDict(dict(
      method="full",  # full / linear_probe / freeze_bottom / bitfit / lora / dora / adapter_houlsby /
      # adapter_pfeiffer / ia3 / prefix / prompt, or a '+'-joined combination (lora+bitfit)
      freeze_layers=0,  # freeze_bottom: number of bottom layers frozen (embeddings too)
      # Peak learning rate of the leaves a PEFT method adds or trains (LoRA A/B, biases for bitfit,
      # adapters, ...); 0 = each method's default (jaxft.peft.methods.METHODS, with its source).
      # The head trains at it too unless train.head_learning_rate > 0 or the method also trains
      # pretrained weights at train.learning_rate (full, freeze_bottom). Unused by full.
      learning_rate=0.0,
      lora_rank=8,
      lora_alpha=16.0,
      lora_dropout=0.0,
      # A preset, resolved for every family (BERT-likes, DistilBERT q_lin..., MPNet attn/q...,
      # ModernBERT's fused attn/Wqkv, see jaxft.peft.methods.LORA_TARGETS):
      # qv (query, value), attention (q, k, v, o), all-linear (attention and FFN of every layer);
      # or a regex searched in the Dense module paths.
      lora_targets="qv",
      rslora=False,
      lora_init="default",  # default (B = 0) / pissa (Meng et al. 2024: A, B from W's top-r SVD)
      lora_plus_ratio=0.0,  # LoRA+ (Hayou et al. 2024): B trains at ratio x the A rate; 0/1 = off
      # (IA)^3: regex over Dense module paths (key/value and FFN output projections of every family;
      # ModernBERT: its fused attn/Wqkv, so the queries are rescaled too, and mlp/Wo)
      ia3_targets=r"(^|/)(key|value|k_lin|v_lin|k|v|key_proj|value_proj)$|(^|/)output/dense$"
                  r"|(^|/)ffn/lin2$"
                  r"|(^|/)attn/Wqkv$|(^|/)mlp/Wo$",
      adapter_size=64,
      prefix_length=16,
      prompt_length=16,
  ))

  c.objective = ml_collections.ConfigDict()
  c.objective.name = "supervised"
  from jaxft.objectives import registry  # late: objectives import this module's users
  for name, opts in sorted(registry.defaults().items()):
    c.objective[name] = ml_collections.ConfigDict(opts)

  c.distill = ml_collections.ConfigDict(dict(
      teacher="",  # a fine-tuned teacher (HF dir, e.g. an exported jaxft run); "" = no distillation
      alpha=0.5,  # weight of the hard-label CE; 1 - alpha goes to the T^2-scaled KL
      temperature=2.0,
      hidden_weight=0.0,  # TinyBERT hidden-state MSE through a learned projection
      attention_weight=0.0,  # attention-map MSE
      layer_map="uniform",  # uniform / last / first / explicit "1,3,5"
      attention_heads="match",
      student_layers="",  # e.g. "0,2,4,6,8,10": student = these teacher layers (model.name ignored)
      own_tokenizer=False,  # teacher tokenizes with its own tokenizer (needs cache_teacher_logits)
      cache_teacher_logits=True,  # run the teacher once over the train set, before training
  ))

  c.prune = ml_collections.ConfigDict(dict(
      method="",  # "" = dense; magnitude / movement / soft_movement
      final_sparsity=0.9,  # fraction of encoder weights removed at the end
      initial_sparsity=0.0,
      begin_fraction=0.1,  # cubic schedule from this fraction of training ...
      end_fraction=0.8,  # ... to this one
      frequency=100,  # steps between mask updates
      scope="global",  # global / layer
      score_init=0.0,
      score_learning_rate=1e-2,  # movement scores' learning rate (no weight decay)
      soft_threshold=0.1,  # soft movement: tau
      l1_weight=400.0,  # soft movement: lambda of the score L1 penalty
  ))

  c.self_training = ml_collections.ConfigDict(dict(
      rounds=0,  # > 0: Noisy Student rounds (jaxft.recipes.self_training); needs labeled_per_class
      threshold=0.0,  # teacher confidence a pool row needs to be pseudo-labeled
      max_per_class=0,  # > 0: at most this many rows per predicted class, most confident first
      teacher="",  # a finished workdir (same data config) as the first teacher instead of round 0
  ))

  c.multitask = ml_collections.ConfigDict(dict(
      tasks="",  # "" = off; "sst2,mrpc": data catalog tasks (each from data.data_dir, with the
      # other data.* options), one shared encoder and a head per task (jaxft.recipes.multitask)
      temperature=1.0,  # task i trains a step with p_i ~ n_i^(1/T): 1 = by size, large = uniform
  ))

  c.continual = ml_collections.ConfigDict(dict(
      tasks="",  # "" = off; "sst2,mrpc,rte": tasks trained one after another on one encoder,
      # a head per task (jaxft.recipes.continual); every stage ends with an eval of the tasks seen
      steps_per_task=0,  # steps of each stage (> 0 when continual.tasks is set)
      replay=0.0,  # probability in [0, 1) that a step of stage k > 0 trains on an earlier task
      memory_batches=0,  # replay draws from the first M train batches of each task; 0 = all
      ewc_lambda=0.0,  # > 0: EWC penalty lambda/2 sum_j F_j (theta - theta*_j)^2 on the encoder
      fisher_examples=256,  # train examples of a finished task its Fisher diagonal averages over
  ))

  c.quant = ml_collections.ConfigDict(dict(
      method="",  # "" = none; ptq_int8 (after training) / qat_int8 (fake-quant while training)
      embeddings=False,  # also quantize embedding tables
      exclude="",  # regex of params to keep in float
  ))

  c.mesh = ml_collections.ConfigDict(dict(
      data=-1,  # devices on the data axis; -1 = all that the other axes leave
      fsdp=1,  # devices that shard parameters and optimizer state
  ))
  return c


def movie_reviews_cpu(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The quickstart's data and schedule, which run on two CPU cores in minutes: MR sentence
  polarity (offline asset `mr`, seeded 90/10 split), length <= 64 in buckets 32/64, batch 32, one
  epoch. Experiments use it for their "mr" rows, the CPU-sized version of their GLUE grids."""
  c.data.name = "mr"
  c.data.data_dir = ""
  c.data.max_length = 64
  c.data.bucket_boundaries = "32,64"
  c.train.batch_size = 32
  c.train.eval_batch_size = 128
  c.train.num_epochs = 1.0
  c.train.num_steps = 0
  c.train.warmup_ratio = 0.06
  c.train.log_every = 20
  return c


def _closest(key: str, options: Iterable[str]) -> str:
  close = difflib.get_close_matches(key, list(options), n=1, cutoff=0.5)
  return f" Did you mean {close[0]!r}?" if close else ""


def _parse_value(raw: str, current: Any, key: str):
  """Parses an override string into the type of the current value."""
  if isinstance(current, bool):
    low = raw.lower()
    if low in ("true", "1", "yes"):
      return True
    if low in ("false", "0", "no"):
      return False
    raise ValueError(f"--config.{key}={raw!r}: expected a boolean (true/false)")
  if isinstance(current, int):
    try:
      return int(raw)
    except ValueError:
      raise ValueError(f"--config.{key}={raw!r}: expected an integer") from None
  if isinstance(current, float):
    try:
      return float(raw)
    except ValueError:
      raise ValueError(f"--config.{key}={raw!r}: expected a number") from None
  if isinstance(current, str):
    return raw
  try:
    return ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    return raw


def apply_override(config: ml_collections.ConfigDict, dotted: str, raw: str) -> None:
  """Sets config.<dotted> from the string `raw`, checking the key exists and the type fits."""
  node = config
  parts = dotted.split(".")
  for i, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      where = ".".join(parts[:i]) or "config"
      keys = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      raise KeyError(f"unknown config key {dotted!r}: {where} has no field {part!r}."
                     f"{_closest(part, keys)} Known fields of {where}: {', '.join(sorted(keys))}")
    if i < len(parts) - 1:
      node = node[part]
  leaf = parts[-1]
  current = node[leaf]
  if isinstance(current, ml_collections.ConfigDict):
    raise KeyError(f"--config.{dotted} names a group, not a value; set one of its fields: "
                   f"{', '.join(sorted(current.keys()))}")
  with node.unlocked():
    node[leaf] = _parse_value(raw, current, dotted)


def load_module(path: str | pathlib.Path):
  """Imports an experiment file and returns the module (get_config, and GRID / PAPER / SEARCH for
  the harness)."""
  file = pathlib.Path(path)
  if not file.is_file():
    raise FileNotFoundError(f"experiment file {str(path)!r} not found; experiments live in "
                            "experiments/*.py (e.g. experiments/quickstart.py)")
  module_spec = importlib.util.spec_from_file_location(f"jaxft_experiment_{file.stem}", file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def load_experiment(spec: str) -> ml_collections.ConfigDict:
  """`path/to/exp.py[:arg]` -> the ConfigDict its get_config(arg) returns."""
  path, _, arg = spec.partition(":")
  module = load_module(path)
  if not hasattr(module, "get_config"):
    raise ValueError(f"{path} defines no get_config(arg)")
  config = module.get_config(arg or None)
  with config.unlocked():
    config.experiment = spec
  return config


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
  """['--config.a.b=1', '--config.c', '2'] -> [('a.b', '1'), ('c', '2')]."""
  out, i = [], 0
  while i < len(args):
    arg = args[i]
    if not arg.startswith("--config."):
      raise ValueError(f"unexpected argument {arg!r}; overrides look like --config.train.batch_size=16")
    body = arg[len("--config."):]
    if "=" in body:
      key, value = body.split("=", 1)
    elif i + 1 < len(args):
      key, value = body, args[i + 1]
      i += 1
    else:
      raise ValueError(f"{arg} needs a value")
    out.append((key, value))
    i += 1
  return out


def load(spec: str, overrides: list[tuple[str, str]] = ()) -> ml_collections.ConfigDict:
  config = load_experiment(spec)
  for key, value in overrides:
    apply_override(config, key, value)
  config.lock()
  return config


def to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def from_json(text: str) -> ml_collections.ConfigDict:
  """A workdir's saved config back into a locked ConfigDict over base_config()'s keys."""
  saved = json.loads(text)
  config = base_config()

  def fill(node, values, prefix=""):
    for k, v in values.items():
      if isinstance(v, dict):
        if k not in node:
          with node.unlocked():
            node[k] = ml_collections.ConfigDict()
        fill(node[k], v, f"{prefix}{k}.")
      else:
        with node.unlocked():
          node[k] = v

  if "packing" not in saved.get("data", {"packing": None}):
    config.data.packing = False  # saved before packing existed: that run's batches were bucketed
  fill(config, saved)
  config.lock()
  return config
