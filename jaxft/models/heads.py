"""Task heads and the model that puts a family's backbone and a head together.

Parameter names mirror the HF task classes so checkpoints load and export by name:
sequence heads: "linear" (BERT, ViT): classifier(Dropout(pooled)); "dense_tanh" (RoBERTa, MPNet) /
"dense_gelu" (ELECTRA): classifier/out_proj(Dropout(act(classifier/dense(Dropout(pooled)))));
"pre_classifier" (DistilBERT): classifier(Dropout(relu(pre_classifier(pooled))));
"prediction_head" (ModernBERT): classifier(Dropout(head(pooled))), head = norm(act(dense));
"context_pooler" (DeBERTa): classifier(Dropout(pooler(pooled))), pooler = act(dense(Dropout)).
Token head: classifier(Dropout(h)), with the prediction head first for "prediction_head".
MLM heads tie the decoder to the word embeddings: logits = LN(act(W h)) E^T + b, with HF's
module names per family (cls/predictions, lm_head, vocab_*, generator_*; ModernBERT: head, then
decoder; DeBERTa: cls/predictions or lm_predictions/lm_head, by its config's `legacy`).
Pooling turns [B, S, H] into the [B, H] the sequence head reads: "pooler" (HF pooler,
tanh(W h_0)), "cls" (h_0), "mean" (mean over real tokens).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from jaxft.models import deberta
from jaxft.models import layers as L
from jaxft.models import modernbert
from jaxft.models.outputs import ModelOutput

HEADS = (None, "sequence_classification", "regression", "token_classification", "mlm")
POOLINGS = ("pooler", "cls", "mean")
SEQUENCE_HEADS = ("sequence_classification", "regression")


@dataclasses.dataclass(frozen=True)
class HeadConfig:
  """kind: one of HEADS; num_labels; pooling: one of POOLINGS (sequence heads); style: the
  sequence head layout ("linear", "dense_tanh", "dense_gelu", "pre_classifier",
  "prediction_head", "context_pooler"); mlm: the MLM layout ("bert", "roberta", "distilbert",
  "electra", "modernbert", "deberta"); dropout: classifier dropout rate."""

  kind: Optional[str] = None
  num_labels: int = 0
  pooling: str = "cls"
  style: str = "linear"
  mlm: str = "bert"
  dropout: float = 0.1


def _dense(cfg, features, name):
  return nn.Dense(features, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                  kernel_init=nn.initializers.normal(0.02), name=name)


class DenseHead(nn.Module):
  """"classifier" of RoBERTa/MPNet/ELECTRA: out_proj(Dropout(act(dense(Dropout(x)))))."""

  cfg: L.ArchConfig
  num_labels: int
  act: str
  dropout: float

  @nn.compact
  def __call__(self, x, deterministic):
    drop = nn.Dropout(self.dropout)
    x = _dense(self.cfg, self.cfg.hidden_size, "dense")(drop(x, deterministic=deterministic))
    x = drop(L.activation(self.act)(x), deterministic=deterministic)
    return _dense(self.cfg, self.num_labels, "out_proj")(x)


class SequenceHead(nn.Module):
  cfg: L.ArchConfig
  head: HeadConfig

  @nn.compact
  def __call__(self, pooled, deterministic):
    cfg, hc = self.cfg, self.head
    drop = nn.Dropout(hc.dropout)
    if hc.style == "linear":
      return _dense(cfg, hc.num_labels, "classifier")(drop(pooled, deterministic=deterministic))
    if hc.style in ("dense_tanh", "dense_gelu"):
      act = "tanh" if hc.style == "dense_tanh" else "gelu"
      return DenseHead(cfg, hc.num_labels, act, hc.dropout, name="classifier")(pooled,
                                                                                deterministic)
    if hc.style == "pre_classifier":
      x = nn.relu(_dense(cfg, cfg.hidden_size, "pre_classifier")(pooled))
      return _dense(cfg, hc.num_labels, "classifier")(drop(x, deterministic=deterministic))
    if hc.style == "prediction_head":
      x = modernbert.PredictionHead(cfg, name="head")(pooled)
      return _dense(cfg, hc.num_labels, "classifier")(drop(x, deterministic=deterministic))
    if hc.style == "context_pooler":
      x = deberta.ContextPooler(cfg, name="pooler")(pooled, deterministic)
      return _dense(cfg, hc.num_labels, "classifier")(drop(x, deterministic=deterministic))
    raise ValueError(f"unknown sequence head style {hc.style!r}")


class TokenHead(nn.Module):
  """classifier(Dropout(h)) on every token: [B, S, H] -> [B, S, num_labels]."""

  cfg: L.ArchConfig
  head: HeadConfig

  @nn.compact
  def __call__(self, h, deterministic):
    if self.head.style == "prediction_head":
      h = modernbert.PredictionHead(self.cfg, name="head")(h)
    h = nn.Dropout(self.head.dropout)(h, deterministic=deterministic)
    return _dense(self.cfg, self.head.num_labels, "classifier")(h)


class TiedDecoder(nn.Module):
  """h E^T + b with the word-embedding table E [V, E]; only the bias [V] is a parameter here
  (none when not use_bias: ModernBERT's decoder_bias=False)."""

  cfg: L.ArchConfig
  use_bias: bool = True

  @nn.compact
  def __call__(self, h, table):
    logits = jnp.dot(h, table.astype(h.dtype).T)
    if not self.use_bias:
      return logits
    bias = self.param("bias", nn.initializers.zeros, (table.shape[0],), self.cfg.param_dtype)
    return logits + bias.astype(h.dtype)


def _transform(cfg, h, features, act, dense_name, ln_name, eps):
  h = L.activation(act)(_dense(cfg, features, dense_name)(h))
  return L.layer_norm(cfg, ln_name, eps)(h)


class Transform(nn.Module):
  """dense -> act -> LayerNorm as its own named module (BERT "transform", ELECTRA
  "generator_predictions")."""

  cfg: L.ArchConfig
  features: int
  act: str
  eps: float

  @nn.compact
  def __call__(self, h):
    return _transform(self.cfg, h, self.features, self.act, "dense", "LayerNorm", self.eps)


class BertPredictions(nn.Module):
  """"predictions": transform, then the tied decoder with the bias stored as predictions/bias."""

  cfg: L.ArchConfig

  @nn.compact
  def __call__(self, h, table):
    cfg = self.cfg
    h = Transform(cfg, cfg.hidden_size, cfg.hidden_act, cfg.layer_norm_eps, name="transform")(h)
    bias = self.param("bias", nn.initializers.zeros, (table.shape[0],), cfg.param_dtype)
    return jnp.dot(h, table.astype(h.dtype).T) + bias.astype(h.dtype)


class BertMLM(nn.Module):
  cfg: L.ArchConfig

  @nn.compact
  def __call__(self, h, table):
    return BertPredictions(self.cfg, name="predictions")(h, table)


class RobertaLMHead(nn.Module):
  """"lm_head" of RoBERTa/MPNet: dense -> exact gelu -> layer_norm -> tied decoder + bias."""

  cfg: L.ArchConfig

  @nn.compact
  def __call__(self, h, table):
    cfg = self.cfg
    h = _transform(cfg, h, cfg.hidden_size, "gelu", "dense", "layer_norm", cfg.layer_norm_eps)
    bias = self.param("bias", nn.initializers.zeros, (table.shape[0],), cfg.param_dtype)
    return jnp.dot(h, table.astype(h.dtype).T) + bias.astype(h.dtype)


class MLMHead(nn.Module):
  cfg: L.ArchConfig
  head: HeadConfig

  @nn.compact
  def __call__(self, h, table):
    cfg, style = self.cfg, self.head.mlm
    if table is None:
      raise ValueError(f"model_type {cfg.model_type!r} has no word embeddings for an MLM head")
    if style == "bert":
      return BertMLM(cfg, name="cls")(h, table)
    if style == "roberta":
      return RobertaLMHead(cfg, name="lm_head")(h, table)
    if style == "distilbert":
      h = _transform(cfg, h, cfg.hidden_size, cfg.mlm_act, "vocab_transform", "vocab_layer_norm",
                     1e-12)
      return TiedDecoder(cfg, name="vocab_projector")(h, table)
    if style == "electra":
      h = Transform(cfg, cfg.embedding_size or cfg.hidden_size, "gelu", cfg.layer_norm_eps,
                    name="generator_predictions")(h)
      return TiedDecoder(cfg, name="generator_lm_head")(h, table)
    if style == "modernbert":
      h = modernbert.PredictionHead(cfg, name="head")(h)
      return TiedDecoder(cfg, cfg.decoder_bias, name="decoder")(h, table)
    if style == "deberta":
      return deberta.MLMHead(cfg, name="cls" if cfg.legacy_mlm else "lm_predictions")(h, table)
    raise ValueError(f"unknown MLM head layout {style!r}")


def pool(kind: str, out: L.BackboneOutput):
  """[B, S, H] -> [B, H] by `kind` (see module docstring); packed rows -> [E, H], per example."""
  if kind == "pooler":
    if out.pooled is None:
      raise ValueError("pooling='pooler' needs the backbone's pooler (add_pooling_layer)")
    return out.pooled
  if kind == "cls":
    return L.first_tokens(out.last_hidden_state, out.packing)
  if kind == "mean":
    if out.packing is not None:
      return out.packing.mean(out.last_hidden_state)
    return L.masked_mean(out.last_hidden_state, out.mask)
  raise ValueError(f"unknown pooling {kind!r}; choose one of {POOLINGS}")


class TaskModel(nn.Module):
  """Backbone ("backbone") + head ("head"): params {"backbone": ..., "head": ...}.

  inputs: dict with input_ids / attention_mask / token_type_ids (text) or pixel_values (images);
  packed rows add segment_ids / position_ids / example_start (layers.Packing), and sequence heads
  then return one row per example slot, [E, num_labels].
  Returns outputs.ModelOutput; logits are float32: [B, num_labels] (sequence heads),
  [B, S, num_labels] (token), [B, S, vocab] (MLM), None (bare encoder).
  """

  backbone_cls: Any
  cfg: L.ArchConfig
  head: HeadConfig = HeadConfig()

  @nn.compact
  def __call__(self, inputs, *, deterministic=True, embedding_perturbation=None,
               output_hidden_states=False, output_attentions=False):
    out = self.backbone_cls(self.cfg, name="backbone")(
        **inputs, deterministic=deterministic, embedding_perturbation=embedding_perturbation,
        output_hidden_states=output_hidden_states, output_attentions=output_attentions)
    kind, logits, pooled = self.head.kind, None, out.pooled
    if kind in SEQUENCE_HEADS:
      pooled = pool(self.head.pooling, out)
      logits = SequenceHead(self.cfg, self.head, name="head")(pooled, deterministic)
    elif kind == "token_classification":
      logits = TokenHead(self.cfg, self.head, name="head")(out.last_hidden_state, deterministic)
    elif kind == "mlm":
      logits = MLMHead(self.cfg, self.head, name="head")(out.last_hidden_state,
                                                         out.word_embeddings)
    elif kind is not None:
      raise ValueError(f"unknown head {kind!r}; choose one of {HEADS}")
    return ModelOutput(
        last_hidden_state=out.last_hidden_state, embeddings=out.embeddings,
        logits=None if logits is None else logits.astype(jnp.float32), pooled=pooled,
        hidden_states=out.hidden_states, attentions=out.attentions)
