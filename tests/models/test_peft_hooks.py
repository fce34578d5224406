"""PEFT hooks in the ports: default spec = HF names; identity-at-init methods; prefix/prompt."""

import re

import jax
import numpy as np
import pytest
from flax import traverse_util

from jaxft.models import from_pretrained
from jaxft.models import hf as hfio
from jaxft.models.peft_layers import PeftSpec

import hf_tiny as tiny


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  return tiny.saved_bert_classifier(tmp_path_factory)


_logits = tiny.logits


def test_default_peft_spec_gives_exactly_the_hf_parameter_names(ckpt):
  m = from_pretrained(ckpt[0], head="sequence_classification", peft=PeftSpec())
  flat = traverse_util.flatten_dict(m.params)
  names = {hfio.hf_name(p, "bert") for p in flat}
  assert names == set(ckpt[1].state_dict())
  assert not any(hfio.is_peft_path(p) for p in flat)


@pytest.mark.parametrize("spec", [PeftSpec(lora_rank=4), PeftSpec(adapter_size=4),
                                  PeftSpec(lora_rank=2, lora_targets="intermediate", dora=True,
                                           ia3_targets="value")],
                         ids=["lora", "adapter", "dora_ia3"])
def test_identity_at_init_peft_leaves_logits_unchanged(ckpt, spec):
  b = tiny.batch("bert")
  plain = from_pretrained(ckpt[0], head="sequence_classification")
  peft = from_pretrained(ckpt[0], head="sequence_classification", peft=spec)
  info = peft.loading_info
  assert info.missing == [] and info.unexpected == [] and info.added_by_peft
  assert all(re.search(r"lora_|adapter_|dora_m|ia3", p) for p in info.added_by_peft)
  np.testing.assert_allclose(_logits(peft, b), _logits(plain, b), atol=1e-5, rtol=0)


def test_lora_targets_all_layers_and_starts_at_zero(ckpt):
  m = from_pretrained(ckpt[0], head="sequence_classification", peft=PeftSpec(lora_rank=4))
  added = m.loading_info.added_by_peft
  assert sorted(p for p in added if p.endswith("lora_b")) == [
      f"backbone/encoder/layer_{i}/attention/self/{n}/lora_b" for i in (0, 1)
      for n in ("query", "value")]
  b = tiny.batch("bert")
  np.testing.assert_array_equal(_logits(m, b), _logits(m.with_params(m.params), b))


def test_prefix_and_prompt_keep_shapes_and_change_outputs(ckpt):
  b = tiny.batch("bert")
  plain = from_pretrained(ckpt[0], head="token_classification", num_labels=3)
  base = jax.jit(plain.apply)(plain.params, b)
  for spec in (PeftSpec(prefix_length=3), PeftSpec(prompt_length=2)):
    m = from_pretrained(ckpt[0], head="token_classification", num_labels=3, peft=spec, seed=0)
    # Same head init (seed 0) and backbone weights; only the PEFT parameters differ.
    out = jax.jit(lambda p: m.apply(p, b, output_hidden_states=True, output_attentions=True))(
        m.params)
    assert out.logits.shape == base.logits.shape == (3, 11, 3)
    assert all(h.shape == (3, 11, 36) for h in out.hidden_states)
    extra = spec.prefix_length or spec.prompt_length
    assert out.attentions[0].shape[-1] == 11 + extra
    assert np.abs(np.asarray(out.last_hidden_state - base.last_hidden_state)).max() > 1e-4
