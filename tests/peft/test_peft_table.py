"""experiments/peft_table.py: every grid cell loads, its PEFT spec builds, and the MPNet target
regexes name real MPNet modules."""

import pathlib

import pytest

from jaxft import config as config_lib
from jaxft import peft
from jaxft.models import init_random
from jaxft.core.state import flatten

EXP = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "peft_table.py"


def load(arg):
  return config_lib.load(f"{EXP}:{arg}")


def test_grid_cells_load_and_paper_cells_exist():
  config = config_lib.load_experiment(f"{EXP}:lora:sst2")
  assert config.peft.method == "lora" and config.peft.lora_rank == 8
  exp = config_lib.load_module(EXP)
  paper, cpu = exp.GRIDS["paper"], exp.GRIDS["cpu"]
  assert len(paper) == 8 * 5 and paper["lora-rte"] == "lora:rte"
  assert {row for row, _ in exp.PAPER} <= set(paper)
  assert exp.PAPER[("lora-rte", "accuracy")] == 86.6 and exp.PAPER[("full-cola", "mcc")] == 63.6
  assert exp.PAPER[("bitfit-stsb", "pearson")] == 90.8 and len(exp.PAPER) == 5 * 5
  assert list(cpu) == ["full", "bitfit", "adapter_h8", "lora", "dora", "ia3", "prefix"]
  for arg in [*paper.values(), *cpu.values()]:
    c = load(arg)
    peft.spec_from_config(c.peft)  # every method's fields are valid
  assert load("adapter_h24:rte").peft.adapter_size == 24
  assert load("full:mrpc").train.learning_rate == 1e-4
  # PEFT rows set peft.learning_rate (train.learning_rate would not reach the PEFT leaves)
  lora = load("lora:mr")
  assert lora.peft.learning_rate == 5e-4
  from jaxft.train.optim import learning_rates
  assert learning_rates(lora.train, lora.peft, ["head/classifier/kernel", "x/query/lora_b"]) == {
      "head": 5e-4, "lora": 5e-4}
  with pytest.raises(ValueError, match="unknown method 'lorra'"):
    load("lorra:sst2")


def test_mpnet_targets_match_real_mpnet_modules():
  hf = dict(model_type="mpnet", vocab_size=61, hidden_size=36, num_hidden_layers=2,
            num_attention_heads=3, intermediate_size=50, max_position_embeddings=40)
  c = load("lora:sst2,mpnet-base").peft
  with c.unlocked():
    c.method = "lora+ia3"
  m = init_random(hf, head="sequence_classification", num_labels=2,
                  peft=peft.spec_from_config(c))
  flat = flatten(m.params)
  labels = peft.partition(c, flat, 2)
  lora = sorted(k.rsplit("/", 1)[0] for k in flat if k.endswith("lora_a"))
  ia3 = sorted(k.rsplit("/", 2)[1] for k in flat if k.endswith("/ia3"))
  assert lora == [f"backbone/encoder/layer_{i}/attention/attn/{p}" for i in (0, 1) for p in "qv"]
  assert ia3 == sorted(["k", "v", "o", "dense"] * 2)
  assert all(labels[k] == "trainable" for k in flat if k.endswith(("lora_a", "lora_b", "ia3")))
