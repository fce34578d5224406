"""Supervised GLUE small tasks (CoLA, SST-2, MRPC, RTE, STS-B) with MiniLM-L6 or MPNet-base.

    jaxft train --config experiments/glue_small.py:sst2 --workdir workdirs/sst2 \
        --config.data.data_dir=../shared/data/glue
    jaxft train --config experiments/glue_small.py:mrpc,mpnet-base --workdir workdirs/mrpc-mpnet \
        --config.data.data_dir=../shared/data/glue
    jaxft table experiments/glue_small.py --seeds 5

Arg: "<task>[,<model>]", task in cola, sst2, mrpc, rte, stsb; model an asset name (minilm-l6,
mpnet-base), local HF dir or hub id (default minilm-l6). Settings of the Hugging Face run_glue
reference: lr 2e-5, 3 epochs (5 for MRPC), batch 32, max length 128; MiniLM, being small, uses
lr 1e-4 (what the MiniLM authors used for small models).

Published numbers (GLUE dev unless said; ../shared/REFERENCES.md):
| task (metric) | BERT-base paper (test) | HF PyTorch run_glue | HF Flax, 5 seeds | MiniLM-L6-H384 |
| SST-2 acc     | 93.5 | 92.32       | 92.23 +/- 0.57 | 91.5 |
| MRPC F1/acc   | 88.9 F1 | 88.85/84.07 | 88.97/84.36 | 88.9 |
| CoLA MCC      | 52.1 | 56.53       | 59.04 +/- 1.06 | 47.5 |
| RTE acc       | 66.4 | 65.70       | 64.76 +/- 1.04 | 68.8 |
| STS-B P/S     | 85.8 (S) | 88.64/88.48 | 88.94/88.63 | - |
"""

from jaxft.config import base_config

TASKS = ("cola", "sst2", "mrpc", "rte", "stsb")

# For `jaxft table`: the grid (name -> get_config arg) and the paper numbers beside ours.
GRID = {t: t for t in TASKS}
PAPER = {  # HF Flax run_flax_glue, BERT-base, dev, 5 seeds: the closest published JAX reference
    ("cola", "mcc"): 59.04, ("sst2", "accuracy"): 92.23, ("mrpc", "f1"): 88.97,
    ("rte", "accuracy"): 64.76, ("stsb", "pearson"): 88.94,
}


def get_config(arg=None):
  task, _, model = (arg or "sst2").partition(",")
  if task not in TASKS:
    raise ValueError(f"glue_small: unknown task {task!r}; choose one of {', '.join(TASKS)}")
  c = base_config()
  c.model.name = model or "minilm-l6"
  c.data.name = task
  c.data.data_dir = "../shared/data/glue"
  c.data.max_length = 128
  c.train.batch_size = 32
  c.train.num_epochs = 5.0 if task == "mrpc" else 3.0
  small = c.model.name == "minilm-l6"
  c.train.learning_rate = 1e-4 if small else 2e-5
  c.train.warmup_ratio = 0.1
  c.train.eval_every = 0
  return c
