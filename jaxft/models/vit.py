"""ViT (Dosovitskiy et al. 2021) encoder for image classification.

x [B, H, W, C] -> non-overlapping p x p patches linearly embedded (a stride-p convolution),
[CLS] prepended, learned position embeddings added; pre-LN layers
h' = h + Dropout(W_o MHA(LN(h))), h'' = h' + Dropout(W_2 act(W_1 LN(h'))); final LayerNorm.
Pixel values are NHWC (the jaxft batch contract); the HF conv kernel [out, in, kh, kw] is stored as
Flax [kh, kw, in, out]. HF (checkpoint) names: embeddings/{cls_token, position_embeddings,
patch_embeddings/projection}, encoder/layer_N/{layernorm_before, attention/attention/{query,key,
value}, attention/output/dense, intermediate/dense, output/dense, layernorm_after}, layernorm.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxft.models import layers as L
from jaxft.models.peft_layers import Adapter


def _pair(x):
  return tuple(x) if isinstance(x, (list, tuple)) else (x, x)


def arch_from_hf(hf) -> dict:
  head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
  if _pair(hf.image_size)[0] != _pair(hf.image_size)[1] or _pair(hf.patch_size)[0] != _pair(
      hf.patch_size)[1]:
    raise ValueError("only square images and patches are supported "
                     f"(image_size={hf.image_size}, patch_size={hf.patch_size})")
  return dict(
      model_type="vit", hidden_size=hf.hidden_size, num_layers=hf.num_hidden_layers,
      num_heads=hf.num_attention_heads, head_dim=head_dim,
      intermediate_size=hf.intermediate_size, hidden_act=hf.hidden_act,
      layer_norm_eps=hf.layer_norm_eps, hidden_dropout=hf.hidden_dropout_prob,
      attention_dropout=hf.attention_probs_dropout_prob, classifier_dropout=0.0,
      image_size=_pair(hf.image_size)[0], patch_size=_pair(hf.patch_size)[0],
      num_channels=hf.num_channels, qkv_bias=hf.qkv_bias,
      pooler_size=getattr(hf, "pooler_output_size", None) or hf.hidden_size,
      pooler_act=getattr(hf, "pooler_act", "tanh"))


class ViTEmbeddings(nn.Module):
  cfg: L.ArchConfig

  @nn.compact
  def __call__(self, pixel_values):
    cfg = self.cfg
    b, hgt, wid, c = pixel_values.shape
    if (hgt, wid) != (cfg.image_size, cfg.image_size) or c != cfg.num_channels:
      raise ValueError(f"pixel_values of shape {pixel_values.shape} (NHWC) do not match the model's "
                       f"{cfg.image_size}x{cfg.image_size}x{cfg.num_channels} images")
    patches = PatchEmbeddings(cfg, name="patch_embeddings")(pixel_values)
    n = patches.shape[1]
    init = nn.initializers.truncated_normal(0.02)
    cls = self.param("cls_token", init, (1, 1, cfg.hidden_size), cfg.param_dtype)
    pos = self.param("position_embeddings", init, (1, n + 1, cfg.hidden_size), cfg.param_dtype)
    cls = jnp.broadcast_to(cls.astype(patches.dtype), (b, 1, cfg.hidden_size))
    return jnp.concatenate([cls, patches], 1) + pos.astype(patches.dtype)


class PatchEmbeddings(nn.Module):
  cfg: L.ArchConfig

  @nn.compact
  def __call__(self, pixel_values):
    cfg = self.cfg
    p = cfg.patch_size
    y = nn.Conv(cfg.hidden_size, (p, p), strides=(p, p), padding="VALID", dtype=cfg.dtype,
                param_dtype=cfg.param_dtype, name="projection")(pixel_values)
    return y.reshape(y.shape[0], -1, cfg.hidden_size)  # row-major patches, as torch flatten(2)


class ViTSelfOutput(nn.Module):
  """"output" of the attention block: Adapter(Dropout(W_o x)) (the residual is added outside)."""

  cfg: L.ArchConfig
  where: str = "attn"
  features: int = 0

  @nn.compact
  def __call__(self, x, deterministic):
    cfg = self.cfg
    y = L.dense(cfg, self.features or cfg.hidden_size, "dense")(x, deterministic=deterministic)
    y = nn.Dropout(cfg.hidden_dropout)(y, deterministic=deterministic)
    return Adapter(cfg.peft, where=self.where, dtype=cfg.dtype, name="adapter")(y)


class ViTAttention(nn.Module):
  cfg: L.ArchConfig

  @nn.compact
  def __call__(self, x, mask, deterministic, output_attentions):
    a, probs = L.MultiHeadAttention(self.cfg, use_bias=self.cfg.qkv_bias, name="attention")(
        x, mask, None, deterministic, output_attentions)
    return ViTSelfOutput(self.cfg, name="output")(a, deterministic), probs


class ViTLayer(nn.Module):
  cfg: L.ArchConfig

  @nn.compact
  def __call__(self, h, mask, bias, deterministic, output_attentions):
    cfg = self.cfg
    a, probs = ViTAttention(cfg, name="attention")(L.layer_norm(cfg, "layernorm_before")(h), mask,
                                                   deterministic, output_attentions)
    h = h + a
    y = L.Intermediate(cfg, name="intermediate")(L.layer_norm(cfg, "layernorm_after")(h),
                                                 deterministic)
    return h + ViTSelfOutput(cfg, where="ffn", name="output")(y, deterministic), probs


class ViTBackbone(nn.Module):
  """inputs: pixel_values float32 [B, H, W, C]. Returns layers.BackboneOutput whose
  last_hidden_state is after the final LayerNorm; hidden_states are the layer outputs before it
  (as HF). Every token is real, so the mask is all True."""

  cfg: L.ArchConfig

  @nn.compact
  def __call__(self, pixel_values, *, deterministic=True, embedding_perturbation=None,
               output_hidden_states=False, output_attentions=False):
    cfg = self.cfg
    emb = ViTEmbeddings(cfg, name="embeddings")(pixel_values.astype(cfg.dtype))
    mask = jnp.ones(emb.shape[:2], bool)
    h, hidden, attns = L.encode_embeddings(
        cfg, emb, mask, deterministic, embedding_perturbation, output_hidden_states,
        output_attentions, L.Encoder(cfg, ViTLayer, name="encoder"))
    h = L.layer_norm(cfg, "layernorm")(h)
    pooled = L.Pooler(cfg, name="pooler")(h) if cfg.add_pooling_layer else None
    return L.BackboneOutput(h, emb, mask, pooled, hidden, attns, None)
