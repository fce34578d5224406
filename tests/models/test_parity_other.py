"""Parity with transformers (PyTorch) for DistilBERT, MPNet (relative position bias) and ViT."""

import numpy as np
import pytest
import torch
from transformers.models.mpnet.modeling_mpnet import MPNetEncoder

from jaxft.models import mpnet
from hf_parity import check_family_head

HEADS = [None, "sequence_classification", "regression", "token_classification", "mlm"]


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("family", ["distilbert", "mpnet"])
def test_parity_text(family, head, tmp_path):
  check_family_head(family, head, tmp_path)


@pytest.mark.parametrize("head", [None, "sequence_classification", "regression"])
def test_parity_vit(head, tmp_path):
  m, out = check_family_head("vit", head, tmp_path)
  assert out.last_hidden_state.shape == (3, 1 + (12 // 4) ** 2, 36)


def test_mpnet_buckets_match_hf_up_to_512():
  # Float32 log-bucketing must agree with torch's to the integer, at every distance MPNet sees.
  rel = torch.arange(512)[None, :] - torch.arange(512)[:, None]
  want = MPNetEncoder.relative_position_bucket(rel, num_buckets=32).numpy()
  np.testing.assert_array_equal(mpnet.relative_position_bucket(512, 512), want)


@pytest.mark.parametrize("family,head", [("vit", "token_classification"), ("vit", "mlm")])
def test_unsupported_head_names_supported_ones(family, head):
  from jaxft.models import init_random
  import hf_tiny as tiny
  with pytest.raises(ValueError, match="supports"):
    init_random(tiny.hf_config(family), head=head, num_labels=2)
