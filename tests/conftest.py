"""Test setup: 8 virtual CPU devices (multi-device tests) and a private asset cache when asked."""

import os

# Must happen before jax is imported anywhere: lets one CPU act as an 8-device mesh.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pathlib

import pytest

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  path = SHARED / "data"
  if not path.is_dir():
    pytest.fail(f"{path} is missing: CI and developers keep ../shared beside the checkout")
  return path


@pytest.fixture(scope="session")
def minilm_dir() -> pathlib.Path:
  from jaxft import assets
  return assets.fetch("minilm-l6")


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, minilm_dir) -> pathlib.Path:
  """A random 2-layer BERT (hidden 32) with MiniLM's real tokenizer, saved as a local Hugging Face
  directory: what end-to-end tests train when the model's quality does not matter."""
  import shutil

  import torch
  import transformers as T
  out = tmp_path_factory.mktemp("tiny_bert")
  for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    shutil.copy(pathlib.Path(minilm_dir) / name, out / name)
  vocab = len(T.AutoTokenizer.from_pretrained(out))
  torch.manual_seed(0)
  cfg = T.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=512)
  T.BertModel(cfg).save_pretrained(out)
  return out
