"""`from_pretrained` / `init_random` / `Model.save_pretrained`: HF directories in, HF directories out.

A `Model` bundles the Flax module, the nested parameter tree {"backbone": ..., "head": ...} (float32
master weights), the transformers config (the source of truth for export) and the tokenizer.
`Model.apply` is the pure apply_fn every objective calls. Loading reports missing / unused /
re-initialised weights like transformers; export writes config.json + model.safetensors in
PyTorch layout (+ tokenizer) that `transformers.AutoModelFor...from_pretrained` loads.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
import functools
import json
import logging
import os
import pathlib
import warnings
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxft import assets
from jaxft.models import heads as H
from jaxft.models import hf as hfio
from jaxft.models import registry
from jaxft.models.outputs import ModelOutput
from jaxft.models.peft_layers import PeftSpec, init_dora, init_pissa

logger = logging.getLogger("jaxft.models")
EXPORT_MARKER = "jaxft_export.json"
PACKING_KEYS = ("segment_ids", "position_ids", "example_start")  # layers.Packing
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json",
                    "spiece.model", "sentencepiece.bpe.model")


@dataclasses.dataclass(eq=False)
class Model:
  """module: heads.TaskModel; params: nested pytree {"backbone", "head"} (no "head" for a bare
  encoder); config: transformers PretrainedConfig (labels, dropouts as used); tokenizer:
  transformers tokenizer or None; head: head kind; pooling: what the sequence head reads;
  loading_info: hf.LoadingInfo (empty for init_random)."""

  module: Any
  params: Any
  config: Any
  tokenizer: Any
  family: registry.Family
  head: Optional[str]
  pooling: Optional[str]
  loading_info: hfio.LoadingInfo = dataclasses.field(default_factory=hfio.LoadingInfo)

  # -------------------------------------------------------------------------------- forward

  def apply(self, params, batch, *, rng=None, deterministic=True, embedding_perturbation=None,
            output_hidden_states=False, output_attentions=False) -> ModelOutput:
    """The apply_fn objectives use: pure, jittable. batch: dict with input_ids / attention_mask /
    token_type_ids (text) or pixel_values [B, H, W, C] (images); other keys are ignored. rng: PRNGKey
    for dropout, required when deterministic=False. embedding_perturbation: added to
    ModelOutput.embeddings (same shape) before the embedding dropout."""
    rngs = {}
    if not deterministic:
      if rng is None:
        raise ValueError("apply(deterministic=False) needs rng, a jax.random.PRNGKey for dropout")
      rngs = {"dropout": rng}
    return self.module.apply({"params": params}, self._inputs(batch), rngs=rngs,
                             deterministic=deterministic,
                             embedding_perturbation=embedding_perturbation,
                             output_hidden_states=output_hidden_states,
                             output_attentions=output_attentions)

  def _inputs(self, batch) -> dict:
    if self.family.inputs == "image":
      if "pixel_values" not in batch:
        raise KeyError("this is an image model: the batch needs pixel_values [B, H, W, C]")
      return {"pixel_values": jnp.asarray(batch["pixel_values"])}
    if "input_ids" not in batch:
      raise KeyError(f"the batch needs input_ids [B, S]; it has keys {sorted(batch)}")
    ids = jnp.asarray(batch["input_ids"], jnp.int32)
    mask = batch.get("attention_mask")
    mask = jnp.ones_like(ids) if mask is None else jnp.asarray(mask, jnp.int32)
    types = batch.get("token_type_ids")
    inputs = {"input_ids": ids, "attention_mask": mask,
              "token_type_ids": None if types is None else jnp.asarray(types, jnp.int32)}
    if "segment_ids" in batch:  # packed rows (jaxft.data.packing)
      inputs.update({k: jnp.asarray(batch[k], jnp.int32) for k in PACKING_KEYS})
    return inputs

  @functools.cached_property
  def _jitted(self):
    return jax.jit(lambda params, batch: self.apply(params, batch))

  def encode(self, input_ids, attention_mask=None, token_type_ids=None):
    """Last hidden state [B, S, H] (deterministic)."""
    return self._jitted(self.params, _batch(input_ids, attention_mask, token_type_ids)
                        ).last_hidden_state

  def logits(self, input_ids, attention_mask=None, token_type_ids=None):
    """Head logits (deterministic); for ViT pass pixel_values as the first argument."""
    if self.head is None:
      raise ValueError("a bare encoder (head=None) has no logits; use encode()")
    if self.family.inputs == "image":
      return self._jitted(self.params, {"pixel_values": input_ids}).logits
    return self._jitted(self.params, _batch(input_ids, attention_mask, token_type_ids)).logits

  def with_params(self, params) -> "Model":
    return dataclasses.replace(self, params=params)

  @property
  def num_labels(self) -> int:
    return self.module.head.num_labels

  # -------------------------------------------------------------------------------- export

  def save_pretrained(self, out_dir, overwrite: bool = False) -> pathlib.Path:
    """Writes config.json, model.safetensors (PyTorch layout, float32) and tokenizer files.

    Refuses PEFT parameters (merge them first) and a non-empty out_dir that is not a previous
    jaxft export unless overwrite=True.
    """
    flat = traverse_util.flatten_dict(jax.device_get(self.params))
    peft = sorted("/".join(p) for p in flat if hfio.is_peft_path(p))
    if peft:
      raise ValueError(
          f"params contain PEFT parameters ({', '.join(peft[:4])}{', ...' if len(peft) > 4 else ''})"
          " that a Hugging Face checkpoint cannot hold; merge them into the base weights first "
          "with jaxft.peft.merge, then save the merged model")
    out = pathlib.Path(out_dir)
    if out.exists() and any(out.iterdir()) and not (out / EXPORT_MARKER).is_file() and not overwrite:
      raise FileExistsError(f"{out} is not empty and is not a previous jaxft export; pass "
                            "overwrite=True or choose an empty directory")
    out.mkdir(parents=True, exist_ok=True)
    for name in hfio.WEIGHT_FILES:  # stale weights from an earlier export must not shadow ours
      if (out / name).exists():
        (out / name).unlink()
    default_pooling = self.family.pooling_of(self.config)
    if self.head in H.SEQUENCE_HEADS and self.pooling != default_pooling:
      warnings.warn(f"exporting a {self.family.model_type} sequence head with pooling="
                    f"{self.pooling!r}; {self.family.hf_class(self.head)} pools with "
                    f"{default_pooling!r}, so transformers will not reproduce these logits "
                    "(jaxft.models.from_pretrained will: the pooling is recorded)")
    cfg = copy.deepcopy(self.config)
    cfg.architectures = [self.family.hf_class(self.head)]
    cfg.dtype = "float32"
    cfg.save_pretrained(str(out))
    tensors = hfio.export_params(flat, base_prefix=self.family.base_prefix,
                                 with_prefix=self.head is not None)
    hfio.write_safetensors(tensors, out / "model.safetensors")
    if self.tokenizer is not None:
      self.tokenizer.save_pretrained(str(out))
    (out / EXPORT_MARKER).write_text(json.dumps(
        {"head": self.head, "pooling": self.pooling, "model_type": self.family.model_type},
        indent=2))
    return out


def _batch(input_ids, attention_mask, token_type_ids) -> dict:
  b = {"input_ids": np.asarray(input_ids)}
  if attention_mask is not None:
    b["attention_mask"] = np.asarray(attention_mask)
  if token_type_ids is not None:
    b["token_type_ids"] = np.asarray(token_type_ids)
  return b


# ---------------------------------------------------------------------------------- building


def _offline() -> bool:
  return any(os.environ.get(k, "0").lower() in ("1", "true", "yes")
             for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "JAXFT_OFFLINE"))


_RESTORING = contextvars.ContextVar("jaxft_restoring", default=False)


@contextlib.contextmanager
def restoring():
  """Within it, from_pretrained does not warn about head (or other) weights the checkpoint lacks
  or re-initialises: the caller overwrites them from a run's own checkpoint (jaxft.train.restore).
  They are still listed in `model.loading_info`."""
  token = _RESTORING.set(True)
  try:
    yield
  finally:
    _RESTORING.reset(token)


def resolve_dir(name_or_path) -> pathlib.Path:
  """Asset name, local directory, or hub id -> local HF model directory."""
  resolved = assets.resolve_model(str(name_or_path))
  p = pathlib.Path(resolved).expanduser()
  if p.is_dir():
    return p
  if p.exists():
    raise ValueError(f"{p} is a file; pass the model directory that holds config.json")
  # resolve_model refused a missing path that can only be local (no hub retries for it); what is
  # left looks like a hub id.
  known = ", ".join(n for n, a in assets.ASSETS.items() if a.kind == "models")
  try:
    from huggingface_hub import snapshot_download
    kw = dict(repo_id=str(resolved), local_files_only=_offline())
    d = pathlib.Path(snapshot_download(allow_patterns=["*.json", "*.safetensors", "*.txt",
                                                       "*.model"], **kw))
    if not any(d.glob("*.safetensors")):
      d = pathlib.Path(snapshot_download(allow_patterns=["*.json", "*.txt", "*.model",
                                                         "pytorch_model*.bin"], **kw))
    return d
  except Exception as e:  # network errors, offline mode, unknown repo: all end here
    raise OSError(
        f"could not get {name_or_path!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
        "This machine may be offline. Use a local model directory (config.json + "
        f"model.safetensors), or an offline asset: `jaxft assets fetch <name>` ({known}) and "
        "pass that name, e.g. from_pretrained('minilm-l6').") from e


def _read_config(d: pathlib.Path):
  cfg_file = d / "config.json"
  if not cfg_file.is_file():
    raise FileNotFoundError(f"{d} has no config.json; pass a Hugging Face model directory")
  model_type = json.loads(cfg_file.read_text()).get("model_type")
  family = registry.get(model_type)  # fails with the supported list before transformers does
  from transformers import AutoConfig
  return AutoConfig.from_pretrained(str(d)), family


def _labels(head, num_labels, id2label, hf, load_head):
  """-> (num_labels, id2label dict) for the requested head (0, None without a label head)."""
  if head not in ("sequence_classification", "regression", "token_classification"):
    return 0, None
  if isinstance(id2label, (list, tuple)):
    id2label = dict(enumerate(id2label))
  if id2label is not None:
    id2label = {int(k): str(v) for k, v in id2label.items()}
    if num_labels is not None and num_labels != len(id2label):
      raise ValueError(f"num_labels={num_labels} but id2label names {len(id2label)} labels")
    num_labels = len(id2label)
  if head == "regression":
    if num_labels not in (None, 1):
      raise ValueError(f"head='regression' has one output; got num_labels={num_labels}")
    num_labels = 1
  if num_labels is None:
    if not load_head:
      raise ValueError(f"head={head!r}: pass num_labels (or id2label); the checkpoint has no "
                       "such head to take the label count from")
    num_labels = hf.num_labels
  if id2label is None:
    old = {int(k): v for k, v in (getattr(hf, "id2label", None) or {}).items()}
    id2label = old if load_head and len(old) == num_labels else {
        i: f"LABEL_{i}" for i in range(num_labels)}
  return num_labels, id2label


def _build(hf, family: registry.Family, head, num_labels, *, dtype, pooling, peft, remat,
           remat_policy, attention_impl, hidden_dropout, attention_dropout, classifier_dropout,
           id2label, load_head=False):
  """Config edits + module for a family; returns (module, hf_config, pooling)."""
  if head not in H.HEADS:
    raise ValueError(f"unknown head {head!r}; choose one of {H.HEADS}")
  family.hf_class(head)
  if dtype not in _DTYPES:
    raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
  hf = copy.deepcopy(hf)
  for keys, value in zip(family.dropout_keys, (hidden_dropout, attention_dropout,
                                               classifier_dropout)):
    if value is not None:
      if keys is None:
        raise ValueError(f"model_type {family.model_type!r} has no classifier dropout to set")
      for key in (keys if isinstance(keys, tuple) else (keys,)):
        setattr(hf, key, float(value))
  n, labels = _labels(head, num_labels, id2label, hf, load_head)
  if labels is not None:
    hf.num_labels = n
    hf.id2label = labels
    hf.label2id = {v: k for k, v in labels.items()}
    hf.problem_type = "regression" if head == "regression" else (
        "single_label_classification" if head == "sequence_classification" else None)
  pooling = pooling or family.pooling_of(hf)
  if pooling not in H.POOLINGS:
    raise ValueError(f"pooling must be one of {H.POOLINGS} or None, got {pooling!r}")
  if pooling == "pooler" and not family.has_pooler:
    raise ValueError(f"{family.model_type} has no pooler; use pooling='cls' or 'mean'")
  if family.pooling_key and head in H.SEQUENCE_HEADS:
    setattr(hf, family.pooling_key, pooling)  # the exported config then pools the same way
  if head == "mlm" and not getattr(hf, "tie_word_embeddings", True):
    raise ValueError("MLM heads with untied decoder weights (tie_word_embeddings=False) are not "
                     "supported")
  add_pooler = family.has_pooler and (head is None or (head in H.SEQUENCE_HEADS and
                                                       pooling == "pooler"))
  arch = family.arch_cls(**family.arch_from_hf(hf), add_pooling_layer=add_pooler,
                         dtype=_DTYPES[dtype], param_dtype=jnp.float32,
                         attention_impl=attention_impl, remat=remat, remat_policy=remat_policy,
                         peft=peft or PeftSpec())
  head_cfg = H.HeadConfig(kind=head, num_labels=n, pooling=pooling, style=family.seq_style,
                          mlm=family.mlm or "bert", dropout=family.head_dropout(hf, head))
  return H.TaskModel(family.backbone, arch, head_cfg), hf, (pooling if head in
                                                              H.SEQUENCE_HEADS else None)


def _init_params(module, family, seed: int, shapes_only: bool = False):
  """Random parameters (normal(0.02) kernels, HF's scheme), or just their ShapeDtypeStructs."""
  arch = module.cfg
  if family.inputs == "image":
    dummy = {"pixel_values": jnp.zeros((1, arch.image_size, arch.image_size, arch.num_channels))}
  else:
    dummy = {"input_ids": jnp.zeros((1, 4), jnp.int32),
             "attention_mask": jnp.ones((1, 4), jnp.int32), "token_type_ids": None}
  init = lambda rng: module.init(rng, dummy)["params"]
  rng = jax.random.PRNGKey(seed)
  return jax.eval_shape(init, rng) if shapes_only else jax.jit(init)(rng)


def _load_tokenizer(d: pathlib.Path, family):
  if family.inputs != "text" or not any((d / f).is_file() for f in _TOKENIZER_FILES):
    return None
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(str(d))


def init_random(config_or_hf_config, head=None, num_labels=None, seed: int = 0, *,
                dtype="float32", pooling=None, peft: Optional[PeftSpec] = None, remat=False,
                remat_policy=None, attention_impl=None, hidden_dropout=None,
                attention_dropout=None, classifier_dropout=None, id2label=None,
                tokenizer=None) -> Model:
  """A randomly initialised model (normal(0.02) weights, as HF) from a transformers config or a
  dict with "model_type" and that config's fields. For tests and training from scratch."""
  if isinstance(config_or_hf_config, dict):
    from transformers import AutoConfig
    fields = dict(config_or_hf_config)
    family = registry.get(fields.get("model_type"))
    hf = AutoConfig.for_model(fields.pop("model_type"), **fields)
  else:
    hf = config_or_hf_config
    family = registry.get(getattr(hf, "model_type", None))
  module, hf, pooling = _build(
      hf, family, head, num_labels, dtype=dtype, pooling=pooling, peft=peft, remat=remat,
      remat_policy=remat_policy, attention_impl=attention_impl, hidden_dropout=hidden_dropout,
      attention_dropout=attention_dropout, classifier_dropout=classifier_dropout,
      id2label=id2label)
  return Model(module, _init_params(module, family, seed), hf, tokenizer, family, head, pooling)


def from_pretrained(name_or_path, head: Optional[str] = None, num_labels: Optional[int] = None, *,
                    dtype="float32", pooling=None, peft: Optional[PeftSpec] = None, remat=False,
                    remat_policy=None, attention_impl=None, hidden_dropout=None,
                    attention_dropout=None, classifier_dropout=None, id2label=None,
                    seed: int = 0, tokenizer=None, load_tokenizer: bool = True) -> Model:
  """Loads an HF model directory, hub id or offline asset name ("minilm-l6") into a jaxft Model.

  head: None (bare encoder), "sequence_classification", "regression" (num_labels=1),
  "token_classification", "mlm". The architecture comes from config.json's model_type (see
  registry). Head weights are reused only when the checkpoint's architecture has the same kind of
  head; a different label count re-initialises the label layer with a warning. Weights that are
  new, unused or PEFT-added are logged and kept in `model.loading_info`. tokenizer: use this one
  instead of AutoTokenizer.from_pretrained(dir) (load_tokenizer=False: none).
  """
  d = resolve_dir(name_or_path)
  hf, family = _read_config(d)
  archs = getattr(hf, "architectures", None) or []
  ckpt_kind = registry.head_kind_of(archs[0]) if archs else None
  want = "sequence_classification" if head == "regression" else head
  load_head = head is not None and ckpt_kind == want
  marker = d / EXPORT_MARKER
  if pooling is None and marker.is_file() and head in H.SEQUENCE_HEADS and load_head:
    pooling = json.loads(marker.read_text()).get("pooling")
  module, hf, pooling = _build(
      hf, family, head, num_labels, dtype=dtype, pooling=pooling, peft=peft, remat=remat,
      remat_policy=remat_policy, attention_impl=attention_impl, hidden_dropout=hidden_dropout,
      attention_dropout=attention_dropout, classifier_dropout=classifier_dropout,
      id2label=id2label, load_head=load_head)
  shapes = traverse_util.flatten_dict(_init_params(module, family, seed, shapes_only=True))
  state = hfio.read_state_dict(d)
  flat, info = hfio.load_params(shapes, state, base_prefix=family.base_prefix,
                                with_prefix=head is not None, load_head=load_head,
                                num_labels=module.head.num_labels, tied_decoder=head == "mlm")
  if any(isinstance(v, jax.ShapeDtypeStruct) for v in flat.values()):
    # Only now pay for a random init: for what the checkpoint lacks (new head, PEFT, mismatch).
    fresh = traverse_util.flatten_dict(jax.device_get(_init_params(module, family, seed)))
    flat = {k: fresh[k] if isinstance(v, jax.ShapeDtypeStruct) else v for k, v in flat.items()}
  cls_name = family.hf_class(head)
  if _RESTORING.get():
    # The caller's checkpoint supplies these weights (jaxft eval / export of a run): a warning
    # that they are "newly initialized" would be wrong.
    logger.debug("%s: weights the run's checkpoint supplies: missing %s, mismatched %s", d,
                 info.missing, [k for k, _, _ in info.mismatched])
  elif info.mismatched:
    details = "; ".join(f"{k}: checkpoint {a} vs model {b}" for k, a, b in info.mismatched)
    msg = (f"{d}: the checkpoint's {ckpt_kind} head has a different number of labels than the "
           f"requested {module.head.num_labels}; re-initialising {details}. Train the head before "
           "using its outputs.")
    warnings.warn(msg, UserWarning, stacklevel=2)
    logger.warning(msg)
  if info.missing and not _RESTORING.get():
    logger.warning("Some weights of %s were not initialized from the model checkpoint at %s and "
                   "are newly initialized: %s", cls_name, d, info.missing)
  if info.unexpected:
    logger.warning("Some weights of the model checkpoint at %s were not used when initializing "
                   "%s: %s", d, cls_name, info.unexpected)
  if info.added_by_peft:
    logger.info("Parameters added by PEFT (freshly initialised): %s", info.added_by_peft)
  params = jax.tree_util.tree_map(jnp.asarray, traverse_util.unflatten_dict(flat))
  spec = module.cfg.peft
  if spec.lora_init == "pissa" and spec.lora_rank > 0:
    # PiSSA splits each loaded target kernel into its top-r part (A, B, trained) and the residual.
    params = init_pissa(params, spec)
  if spec.dora and spec.lora_rank > 0:
    # DoRA's magnitude was initialised from random kernels; reset it to ||W0||_c of the loaded
    # weights so the model starts at the pretrained function.
    params = init_dora(params, spec)
  tok = tokenizer if tokenizer is not None else (
      _load_tokenizer(d, family) if load_tokenizer else None)
  return Model(module, params, hf, tok, family, head, pooling, info)
