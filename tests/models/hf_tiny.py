"""Tiny odd-sized configs of every family and their transformers (PyTorch) reference models.

Odd sizes on purpose: 3 heads of dimension 12, intermediate size 50 (not 4 x hidden), a vocabulary
of 61, right padding of different lengths in one batch.
"""

from __future__ import annotations

import numpy as np
import torch
import transformers as T

COMMON = dict(vocab_size=61, hidden_size=36, num_hidden_layers=2, num_attention_heads=3,
              intermediate_size=50, max_position_embeddings=40)
FAMILIES = ("bert", "roberta", "electra", "distilbert", "mpnet", "vit")
PAD = {"bert": 0, "roberta": 1, "electra": 0, "distilbert": 0, "mpnet": 1}
# What a family's objective sweep steps: one objective per way an objective reads the model
# (logits with dropout; two dropout passes; unlabeled weak / strong views; a teacher copy of the
# params in extras; the embedding-perturbation input; perturbation with extras; the pooled
# embedding). The rest reuse these inputs; tests/objectives steps every one of them on BERT.
FAMILY_OBJECTIVES = ("supervised", "rdrop", "fixmatch", "mean_teacher", "fgm", "smart",
                     "contrastive")


def hf_config(family: str, **kw):
  if family == "bert":
    cfg = T.BertConfig(**COMMON, type_vocab_size=2)
  elif family == "roberta":
    cfg = T.RobertaConfig(**COMMON, type_vocab_size=1, pad_token_id=1)
  elif family == "electra":
    cfg = T.ElectraConfig(**COMMON, embedding_size=24, type_vocab_size=2)
  elif family == "distilbert":
    cfg = T.DistilBertConfig(vocab_size=61, dim=36, n_layers=2, n_heads=3, hidden_dim=50,
                             max_position_embeddings=40)
  elif family == "mpnet":
    cfg = T.MPNetConfig(**COMMON)
  elif family == "vit":
    cfg = T.ViTConfig(hidden_size=36, num_hidden_layers=2, num_attention_heads=3,
                      intermediate_size=50, image_size=12, patch_size=4, num_channels=3)
  else:
    raise KeyError(family)
  for k, v in kw.items():
    setattr(cfg, k, v)
  return cfg


def torch_class(family: str, head):
  stem = {"bert": "Bert", "roberta": "Roberta", "electra": "Electra", "distilbert": "DistilBert",
          "mpnet": "MPNet", "vit": "ViT"}[family]
  if family == "vit" and head in ("sequence_classification", "regression"):
    return T.ViTForImageClassification
  suffix = {None: "Model", "sequence_classification": "ForSequenceClassification",
            "regression": "ForSequenceClassification",
            "token_classification": "ForTokenClassification", "mlm": "ForMaskedLM"}[head]
  return getattr(T, stem + suffix)


def torch_model(family: str, head=None, num_labels: int = 3, seed: int = 0, **cfg_kw):
  """A seeded reference model with every parameter (LayerNorms and biases too) randomised, in
  eval mode with eager attention (so output_attentions works)."""
  torch.manual_seed(seed)
  cfg = hf_config(family, **cfg_kw)
  if head in ("sequence_classification", "token_classification"):
    cfg.num_labels = num_labels
  elif head == "regression":
    cfg.num_labels = 1
    cfg.problem_type = "regression"
  cfg._attn_implementation = "eager"
  model = torch_class(family, head)(cfg)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model.eval()


def batch(family: str, seed: int = 0, batch_size: int = 3, seq: int = 11):
  """numpy inputs: right padding of different lengths (row 0 unpadded), pad ids in the padding."""
  rs = np.random.RandomState(seed)
  if family == "vit":
    return {"pixel_values": rs.randn(batch_size, 12, 12, 3).astype(np.float32)}
  ids = rs.randint(3, 61, (batch_size, seq)).astype(np.int32)
  mask = np.ones_like(ids)
  for i in range(1, batch_size):
    mask[i, max(2, seq - 3 * i):] = 0
  ids = np.where(mask == 1, ids, PAD[family]).astype(np.int32)
  b = {"input_ids": ids, "attention_mask": mask}
  if family in ("bert", "electra"):
    types = np.zeros_like(ids)
    types[:, seq // 2:] = 1
    b["token_type_ids"] = types * mask
  return b


def torch_forward(model, family: str, b: dict, **kw):
  with torch.no_grad():
    if family == "vit":
      px = torch.tensor(b["pixel_values"]).permute(0, 3, 1, 2)  # NHWC -> NCHW
      return model(pixel_values=px, **kw)
    args = {k: torch.tensor(v, dtype=torch.long) for k, v in b.items()}
    return model(**args, **kw)


def hf_logits(cls, d, family: str, b: dict):
  """Loads export dir `d` with transformers class `cls` (asserting nothing is missing, unused or
  mismatched) and returns (its logits on batch b as numpy, the model)."""
  ref, info = cls.from_pretrained(str(d), output_loading_info=True)
  assert not info["missing_keys"], info
  assert not info["unexpected_keys"] and not info["mismatched_keys"], info
  return torch_forward(ref.eval(), family, b).logits.numpy(), ref


def saved_bert_classifier(tmp_path_factory):
  """(dir, torch model) of a tiny 3-label BERT sequence classifier saved in HF format."""
  d = tmp_path_factory.mktemp("bert_cls")
  ref = torch_model("bert", "sequence_classification", num_labels=3)
  ref.save_pretrained(d)
  return d, ref


def logits(m, b, **kw):
  """A jaxft Model's logits on batch b as numpy (jitted)."""
  import jax
  return np.asarray(jax.jit(lambda p: m.apply(p, b, **kw).logits)(m.params))
