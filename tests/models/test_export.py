"""save_pretrained: every family/head loads in transformers (PyTorch) with the same logits; guards."""

import jax
import numpy as np
import pytest
import transformers as T

from jaxft.models import from_pretrained, init_random
from jaxft.models.peft_layers import PeftSpec

import hf_tiny as tiny

@pytest.mark.parametrize("family,head", [("distilbert", "regression"), ("mpnet", "mlm"),
                                         ("vit", "sequence_classification"),
                                         ("electra", "sequence_classification")])
def test_export_of_other_heads_loads_in_transformers(family, head, tmp_path):
  m = init_random(tiny.hf_config(family), head=head,
                  num_labels=None if head in ("regression", "mlm") else 4, seed=3)
  out = m.save_pretrained(tmp_path / "export")
  cls = T.AutoModelForMaskedLM if head == "mlm" else (
      T.AutoModelForImageClassification if family == "vit" else
      T.AutoModelForSequenceClassification)
  b = tiny.batch(family)
  want, ref = tiny.hf_logits(cls, out, family, b)
  got = np.asarray(jax.jit(m.apply)(m.params, b).logits)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  if head == "regression":
    assert ref.config.problem_type == "regression" and ref.config.num_labels == 1

def test_minilm_classifier_export_keeps_tokenizer_and_pooler(minilm_dir, tmp_path):
  m = from_pretrained("minilm-l6", head="sequence_classification", num_labels=2)
  out = m.save_pretrained(tmp_path / "export")
  tok = T.AutoTokenizer.from_pretrained(str(out))
  enc = tok(["a real sentence", "and another, longer real sentence"], padding=True,
            return_tensors="np")
  b = {k: v.astype(np.int32) for k, v in enc.items()}
  want, _ = tiny.hf_logits(T.AutoModelForSequenceClassification, out, "bert", b)
  np.testing.assert_allclose(np.asarray(m.logits(**b)), want, atol=1e-4, rtol=0)

def test_export_refuses_peft_params_and_foreign_dirs(tmp_path):
  cfg = tiny.hf_config("bert")
  lora = init_random(cfg, head="sequence_classification", num_labels=2,
                     peft=PeftSpec(lora_rank=4))
  with pytest.raises(ValueError, match="merge them into the base weights first"):
    lora.save_pretrained(tmp_path / "lora")
  plain = init_random(cfg, head="sequence_classification", num_labels=2)
  foreign = tmp_path / "foreign"
  foreign.mkdir()
  (foreign / "notes.txt").write_text("keep me")
  with pytest.raises(FileExistsError, match="overwrite=True"):
    plain.save_pretrained(foreign)
  plain.save_pretrained(foreign, overwrite=True)
  assert (foreign / "model.safetensors").is_file() and (foreign / "notes.txt").is_file()
  # A previous export may be replaced without overwrite=True.
  plain.with_params(jax.tree_util.tree_map(lambda x: x * 0, plain.params)).save_pretrained(foreign)
  again = from_pretrained(foreign, head="sequence_classification")
  assert float(np.abs(again.params["head"]["classifier"]["kernel"]).max()) == 0.0

def test_export_with_non_default_pooling_warns_and_reloads_with_it(tmp_path):
  m = init_random(tiny.hf_config("bert"), head="sequence_classification", num_labels=2,
                  pooling="mean")
  with pytest.warns(UserWarning, match="pooling='mean'"):
    out = m.save_pretrained(tmp_path / "export")
  again = from_pretrained(out, head="sequence_classification")
  assert again.pooling == "mean"
  b = tiny.batch("bert")
  np.testing.assert_array_equal(np.asarray(again.logits(**b)), np.asarray(m.logits(**b)))
