"""from_pretrained on bad or unusual input: clear errors, transformers-like reports, warnings."""

import json
import logging

import numpy as np
import pytest
import torch
import transformers as T

from jaxft.models import from_pretrained
from jaxft.models import hf as hfio

import hf_tiny as tiny


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("bert")
  tiny.torch_model("bert").save_pretrained(d)
  return d


def test_unknown_model_type_lists_supported(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
  with pytest.raises(ValueError, match="unsupported model_type 'gpt2'") as e:
    from_pretrained(tmp_path)
  assert ("bert, camembert, deberta-v2, distilbert, electra, modernbert, mpnet, roberta, vit, "
          "xlm-roberta") in str(e.value)


def test_missing_weight_file_says_what_was_looked_for(tmp_path, bert_dir):
  (tmp_path / "config.json").write_text((bert_dir / "config.json").read_text())
  with pytest.raises(FileNotFoundError, match="model.safetensors.*pytorch_model.bin"):
    from_pretrained(tmp_path)


def test_shape_mismatch_names_parameter_and_both_shapes(tmp_path, bert_dir):
  cfg = json.loads((bert_dir / "config.json").read_text())
  cfg["intermediate_size"] = 52
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  (tmp_path / "model.safetensors").write_bytes((bert_dir / "model.safetensors").read_bytes())
  with pytest.raises(ValueError) as e:
    from_pretrained(tmp_path)
  msg = str(e.value)
  # The first misfit in parameter order is the bias [50] vs [52]; the message names it and both.
  assert "checkpoint tensor encoder.layer.0.intermediate.dense.bias has shape (50,)" in msg
  assert "model expects (52,)" in msg


def test_head_label_count_mismatch_reinitialises_with_warning(tmp_path):
  tiny.torch_model("bert", "sequence_classification", num_labels=3).save_pretrained(tmp_path)
  with pytest.warns(UserWarning, match="different number of labels than the requested 5"):
    m = from_pretrained(tmp_path, head="sequence_classification", num_labels=5)
  mismatched = {k: (a, b) for k, a, b in m.loading_info.mismatched}
  assert mismatched == {"classifier.weight": ((3, 36), (5, 36)), "classifier.bias": ((3,), (5,))}
  assert m.config.id2label == {i: f"LABEL_{i}" for i in range(5)}
  assert m.logits(**tiny.batch("bert")).shape == (3, 5)
  # Same label count: reused as is, labels kept.
  same = from_pretrained(tmp_path, head="sequence_classification")
  assert same.num_labels == 3 and same.loading_info.mismatched == []


def test_head_of_another_kind_is_not_reused(tmp_path, caplog):
  tiny.torch_model("bert", "token_classification", num_labels=3).save_pretrained(tmp_path)
  with caplog.at_level(logging.WARNING, logger="jaxft.models"):
    m = from_pretrained(tmp_path, head="sequence_classification", num_labels=3)
  assert sorted(m.loading_info.missing) == ["bert.pooler.dense.bias", "bert.pooler.dense.weight",
                                            "classifier.bias", "classifier.weight"]
  assert sorted(m.loading_info.unexpected) == ["classifier.bias", "classifier.weight"]
  assert "newly initialized" in caplog.text and "were not used" in caplog.text


def test_bare_checkpoint_feeds_a_head_and_reports_it(bert_dir):
  m = from_pretrained(bert_dir, head="mlm")
  assert sorted(m.loading_info.missing) == [
      "cls.predictions.bias", "cls.predictions.transform.LayerNorm.bias",
      "cls.predictions.transform.LayerNorm.weight", "cls.predictions.transform.dense.bias",
      "cls.predictions.transform.dense.weight"]
  assert m.loading_info.unexpected == ["pooler.dense.bias", "pooler.dense.weight"]
  with pytest.raises(ValueError, match="pass num_labels"):
    from_pretrained(bert_dir, head="token_classification")


def test_offline_hub_id_points_to_assets(monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(OSError, match="offline") as e:
    from_pretrained("some-org/some-model-not-cached")
  assert "jaxft assets fetch" in str(e.value) and "minilm-l6" in str(e.value)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    from_pretrained("./no/such/dir")


def test_pytorch_bin_and_bf16_safetensors_load(tmp_path, bert_dir):
  ref = tiny.torch_model("bert")
  b = tiny.batch("bert")
  want = tiny.torch_forward(ref, "bert", b).last_hidden_state.numpy()
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "config.json").write_text((bert_dir / "config.json").read_text())
  torch.save(ref.state_dict(), bin_dir / "pytorch_model.bin")
  got = from_pretrained(bin_dir).encode(**b)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)
  # bf16 on disk (numpy has no bf16: our reader maps it through ml_dtypes) -> exact fp32 values.
  ref.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
  state = hfio.read_state_dict(tmp_path / "bf16")
  m = from_pretrained(tmp_path / "bf16")
  kernel = np.asarray(m.params["backbone"]["encoder"]["layer_1"]["output"]["dense"]["kernel"])
  assert kernel.dtype == np.float32
  np.testing.assert_array_equal(kernel, np.asarray(
      state["encoder.layer.1.output.dense.weight"], np.float32).T)


def test_asset_name_resolves_and_tokenizer_is_auto(minilm_dir):
  m = from_pretrained("minilm-l6", load_tokenizer=True)
  assert isinstance(m.tokenizer, T.PreTrainedTokenizerBase)
  assert m.tokenizer("hello world")["input_ids"][0] == m.tokenizer.cls_token_id
