"""Supervised GLUE small tasks (CoLA, SST-2, MRPC, RTE, STS-B) with MiniLM-L6 or MPNet-base.

    jaxft train --config experiments/glue_small.py:sst2 --workdir workdirs/sst2
    jaxft train --config experiments/glue_small.py:mrpc,mpnet-base --workdir workdirs/mrpc-mpnet
    jaxft table experiments/glue_small.py --seeds 5                  # "paper": the five tasks
    jaxft table experiments/glue_small.py --grid cpu --seeds 1       # what a 2-core CPU ran

Arg: "<task>[,<model>]", task in cola, sst2, mrpc, rte, stsb; model an asset name (minilm-l6,
mpnet-base), local HF dir or hub id (default minilm-l6). Settings of the Hugging Face run_glue
reference: lr 2e-5, 3 epochs (5 for MRPC), batch 32, max length 128; MiniLM, being small, uses
lr 1e-4 (what the MiniLM authors used for small models). Data: the GLUE TSVs under the data root
($JAXFT_DATA or ../shared/data: glue/<TASK>/{train,dev}.tsv).

Grids: "paper" is the five tasks; "cpu" is what this project's 2-core CPU VM ran: CoLA, MRPC,
RTE and STS-B as in "paper" (6-24 min each), SST-2 for one epoch (2,104 steps, 14 min; its best
checkpoint also scored after post-training int8), LoRA r 8 on q, k, v, o over the same epoch
at the default rate 1e-3, at 2e-3, and with LoRA+ (ratio 16), and LoRA r 4 on every linear layer.

Expected, "cpu", seed 0 (measured 2026-11-27 and 2026-11-30, docs/results.md):
| row | metric | jaxft | paper (HF Flax BERT-base) |
| cola | mcc | 25.25 | 59.04 |
| mrpc | f1 | 85.71 | 88.97 |
| rte | accuracy | 60.29 | 64.76 |
| stsb | pearson | 85.90 | 88.94 |
| sst2-1ep | accuracy (int8: the same) | 89.33 | 92.23 (3 epochs) |
| sst2-1ep-lora / -lr2e-3 / -plus16 | accuracy | 87.50 / 87.27 / 67.20 | |
| sst2-1ep-lora-all-r4 (0.73% trains) | accuracy | 88.88 | |

Published numbers (GLUE dev unless said; ../shared/REFERENCES.md):
| task (metric) | BERT-base paper (test) | HF PyTorch run_glue | HF Flax, 5 seeds | MiniLM-L6-H384 |
| SST-2 acc     | 93.5 | 92.32       | 92.23 +/- 0.57 | 91.5 |
| MRPC F1/acc   | 88.9 F1 | 88.85/84.07 | 88.97/84.36 | 88.9 |
| CoLA MCC      | 52.1 | 56.53       | 59.04 +/- 1.06 | 47.5 |
| RTE acc       | 66.4 | 65.70       | 64.76 +/- 1.04 | 68.8 |
| STS-B P/S     | 85.8 (S) | 88.64/88.48 | 88.94/88.63 | - |
"""

from jaxft.config import base_config
from jaxft.harness.grid import Row

TASKS = ("cola", "sst2", "mrpc", "rte", "stsb")

ONE_EPOCH = {"train.num_epochs": 1.0, "train.eval_every": 1000, "train.log_every": 200}
LORA_QKVO = {**ONE_EPOCH, "peft.method": "lora", "peft.lora_targets": "attention"}

# For `jaxft table`: the grids (row -> get_config arg or Row) and the paper numbers beside ours.
GRIDS = {
    "paper": {t: t for t in TASKS},
    "cpu": {
        "cola": "cola", "mrpc": "mrpc", "rte": "rte", "stsb": "stsb",
        "sst2-1ep": Row("sst2", ONE_EPOCH, evaluate={"int8": True}),
        "sst2-1ep-lora": Row("sst2", LORA_QKVO),
        "sst2-1ep-lora-lr2e-3": Row("sst2", {**LORA_QKVO, "peft.learning_rate": 2e-3}),
        "sst2-1ep-lora-plus16": Row("sst2", {**LORA_QKVO, "peft.lora_plus_ratio": 16.0}),
        # LoRA on every linear layer (attention and FFN) at rank 4, alpha 8 (scale 2): 0.73%.
        "sst2-1ep-lora-all-r4": Row("sst2", {**ONE_EPOCH, "peft.method": "lora",
                                             "peft.lora_targets": "all-linear",
                                             "peft.lora_rank": 4, "peft.lora_alpha": 8.0}),
    },
}
PAPER = {  # HF Flax run_flax_glue, BERT-base, dev, 5 seeds: the closest published JAX reference
    ("cola", "mcc"): 59.04, ("sst2", "accuracy"): 92.23, ("mrpc", "f1"): 88.97,
    ("rte", "accuracy"): 64.76, ("stsb", "pearson"): 88.94,
}
METRICS = {"cpu": {"int8 accuracy": "eval_validation_best/int8/eval/accuracy",
                   "trainable %": "trainable_percent", "train examples/s": "train_examples_per_s"}}


def get_config(arg=None):
  task, _, model = (arg or "sst2").partition(",")
  if task not in TASKS:
    raise ValueError(f"glue_small: unknown task {task!r}; choose one of {', '.join(TASKS)}")
  c = base_config()
  c.model.name = model or "minilm-l6"
  c.data.name = task
  c.data.max_length = 128
  c.train.batch_size = 32
  c.train.num_epochs = 5.0 if task == "mrpc" else 3.0
  small = c.model.name == "minilm-l6"
  c.train.learning_rate = 1e-4 if small else 2e-5
  c.train.warmup_ratio = 0.1
  c.train.eval_every = 0
  return c
