"""model_type (config.json) -> the family's backbone, config reader, HF class names and head layout.

Adding a family is one module with `arch_from_hf(hf_config) -> dict` and a backbone, plus one
`Family(...)` entry here. An unknown model_type fails listing the supported ones.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Callable, Optional

from jaxft.models import bert, deberta, distilbert, modernbert, mpnet, vit
from jaxft.models.layers import ArchConfig


@dataclasses.dataclass(frozen=True)
class Family:
  """model_type; backbone (Flax module class); arch_from_hf (HF config -> ArchConfig fields);
  base_prefix: HF base_model_prefix ("bert" in "bert.encoder...") of the task classes;
  hf_classes: head kind -> transformers class name (None = the base model);
  seq_style / default_pooling: the HF sequence head's layout and what it reads;
  has_pooler: the HF base model builds a pooler; pooler_heads: task heads whose HF class keeps it;
  mlm: MLM head layout or None; inputs: "text" or "image";
  dropout_keys: HF config attribute names of (hidden, attention, classifier) dropout, each a name
  or a tuple of names that one setting writes together;
  arch_cls: the ArchConfig (sub)class arch_from_hf's fields build;
  pooling_key: HF config attribute that chooses the sequence head's pooling (ModernBERT's
  classifier_pooling): its value replaces default_pooling, and export writes the pooling used."""

  model_type: str
  backbone: Any
  arch_from_hf: Callable[[Any], dict]
  base_prefix: str
  hf_classes: dict
  seq_style: str
  default_pooling: str
  has_pooler: bool
  pooler_heads: tuple = ()
  mlm: Optional[str] = None
  inputs: str = "text"
  dropout_keys: tuple = ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout")
  arch_cls: Any = ArchConfig
  pooling_key: Optional[str] = None

  def pooling_of(self, hf) -> str:
    """The pooling the HF sequence class of this config uses."""
    return getattr(hf, self.pooling_key) if self.pooling_key else self.default_pooling

  def head_dropout(self, hf, kind: Optional[str]) -> float:
    """Classifier dropout HF applies for this head (only active when deterministic=False)."""
    if self.inputs == "image":
      return 0.0
    if self.model_type == "distilbert":
      return hf.dropout if kind == "token_classification" else hf.seq_classif_dropout
    if self.model_type == "deberta-v2":  # cls_dropout on the sequence head only
      rate = getattr(hf, "cls_dropout", None) if kind in _SEQ else None
      return hf.hidden_dropout_prob if rate is None else rate
    rate = getattr(hf, "classifier_dropout", None)
    return hf.hidden_dropout_prob if rate is None else rate

  def hf_class(self, kind: Optional[str]) -> str:
    if kind not in self.hf_classes:
      supported = ", ".join(repr(k) for k in self.hf_classes)
      raise ValueError(f"model_type {self.model_type!r} has no {kind!r} head; it supports: "
                       f"{supported}")
    return self.hf_classes[kind]


def _text_classes(stem: str, mlm: bool = True) -> dict:
  classes = {None: f"{stem}Model",
             "sequence_classification": f"{stem}ForSequenceClassification",
             "regression": f"{stem}ForSequenceClassification",
             "token_classification": f"{stem}ForTokenClassification"}
  if mlm:
    classes["mlm"] = f"{stem}ForMaskedLM"
  return classes


_SEQ = ("sequence_classification", "regression")


def _roberta_arch(hf) -> dict:
  """XLM-RoBERTa and CamemBERT are RoBERTa checkpoints under their own model_type (and class
  names): the same fairseq position ids."""
  return {**bert.arch_from_hf(hf), "position_ids": "padding_offset"}


FAMILIES: dict[str, Family] = {f.model_type: f for f in [
    Family("bert", bert.BertBackbone, bert.arch_from_hf, "bert", _text_classes("Bert"), "linear",
           "pooler", True, _SEQ, "bert"),
    Family("roberta", bert.BertBackbone, bert.arch_from_hf, "roberta", _text_classes("Roberta"),
           "dense_tanh", "cls", True, (), "roberta"),
    Family("xlm-roberta", bert.BertBackbone, _roberta_arch, "roberta",
           _text_classes("XLMRoberta"), "dense_tanh", "cls", True, (), "roberta"),
    Family("camembert", bert.BertBackbone, _roberta_arch, "roberta", _text_classes("Camembert"),
           "dense_tanh", "cls", True, (), "roberta"),
    Family("electra", bert.BertBackbone, bert.arch_from_hf, "electra", _text_classes("Electra"),
           "dense_gelu", "cls", False, (), "electra"),
    Family("distilbert", distilbert.DistilBertBackbone, distilbert.arch_from_hf, "distilbert",
           _text_classes("DistilBert"), "pre_classifier", "cls", False, (), "distilbert",
           dropout_keys=("dropout", "attention_dropout", "seq_classif_dropout")),
    Family("mpnet", mpnet.MPNetBackbone, mpnet.arch_from_hf, "mpnet", _text_classes("MPNet"),
           "dense_tanh", "cls", True, (), "roberta"),
    Family("vit", vit.ViTBackbone, vit.arch_from_hf, "vit",
           {None: "ViTModel", "sequence_classification": "ViTForImageClassification",
            "regression": "ViTForImageClassification"},
           "linear", "cls", True, (), None, inputs="image",
           dropout_keys=("hidden_dropout_prob", "attention_probs_dropout_prob", None)),
    Family("modernbert", modernbert.ModernBertBackbone, modernbert.arch_from_hf, "model",
           _text_classes("ModernBert"), "prediction_head", "cls", False, (), "modernbert",
           dropout_keys=(("embedding_dropout", "mlp_dropout"), "attention_dropout",
                         "classifier_dropout"),
           arch_cls=modernbert.ModernBertArch, pooling_key="classifier_pooling"),
    Family("deberta-v2", deberta.DebertaV2Backbone, deberta.arch_from_hf, "deberta",
           _text_classes("DebertaV2"), "context_pooler", "cls", False, (), "deberta",
           dropout_keys=("hidden_dropout_prob", "attention_probs_dropout_prob", "cls_dropout"),
           arch_cls=deberta.DebertaArch),
]}


def supported() -> list[str]:
  return sorted(FAMILIES)


def get(model_type: str) -> Family:
  if model_type not in FAMILIES:
    close = difflib.get_close_matches(str(model_type), FAMILIES, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unsupported model_type {model_type!r} in config.json.{hint} Supported "
                     f"model types: {', '.join(supported())}")
  return FAMILIES[model_type]


def head_kind_of(architecture: Optional[str]) -> Optional[str]:
  """"BertForTokenClassification" -> "token_classification" etc.; None for a base model or an
  architecture with no matching jaxft head (e.g. BertForPreTraining)."""
  if not architecture:
    return None
  for suffix, kind in (("ForSequenceClassification", "sequence_classification"),
                       ("ForImageClassification", "sequence_classification"),
                       ("ForTokenClassification", "token_classification"),
                       ("ForMaskedLM", "mlm")):
    if architecture.endswith(suffix):
      return kind
  return None
