"""Parity with transformers (PyTorch) for BERT, RoBERTa and ELECTRA on tiny odd-sized configs."""

import pytest

from hf_parity import check_family_head

HEADS = [None, "sequence_classification", "regression", "token_classification", "mlm"]


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("family", ["bert", "roberta", "electra"])
def test_parity(family, head, tmp_path):
  check_family_head(family, head, tmp_path)
