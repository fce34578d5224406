"""Parameter-efficient fine-tuning on GLUE small tasks, a LoRA-paper-Table-2-style grid.

    jaxft train --config experiments/peft_table.py:lora:sst2 --workdir workdirs/peft/lora-sst2
    jaxft train --config experiments/peft_table.py:adapter_h8:rte,mpnet-base --workdir w/rte-a8
    jaxft table experiments/peft_table.py --seeds 5                # "paper": 8 methods x 5 tasks
    jaxft table experiments/peft_table.py --grid cpu --seeds 1     # MR, one epoch, 7 methods

Arg: "<method>:<task>[,<model>]". Methods (rows): full, bitfit, adapter_h8 and adapter_h24 (Houlsby
adapters, bottleneck m = 8 / 24: 0.31M / 0.90M trainable on a 12-layer 768-wide encoder, the
budgets of the paper's two adapter rows), lora (r = 8, alpha = 8 on query and value, as the paper's
RoBERTa-base runs), dora, ia3, prefix (16 virtual tokens). Tasks (columns): sst2, mrpc, cola, rte,
stsb. Model: minilm-l6 (default; runs on a CPU) or mpnet-base (12 layers, hidden 768: RoBERTa-base's
size, the closest checkpoint available offline); any HF dir or hub id with BERT module names works.

Reproduces: Hu et al. 2021 (LoRA), Table 2, RoBERTa-base, GLUE dev, median of 5 seeds.
Metrics: accuracy (SST-2, MRPC, RTE), Matthews correlation (CoLA), Pearson (STS-B).
| method      | trainable | SST-2 | MRPC | CoLA | RTE  | STS-B |
| full FT     | 125M      | 94.8  | 90.2 | 63.6 | 78.7 | 91.2  |
| BitFit      | 0.1M      | 93.7  | 92.7 | 62.0 | 81.5 | 90.8  |
| Adapter     | 0.3M      | 94.2  | 88.5 | 60.8 | 71.5 | 89.7  |
| Adapter     | 0.9M      | 94.7  | 88.4 | 62.6 | 75.9 | 90.3  |
| LoRA        | 0.3M      | 95.1  | 89.7 | 63.4 | 86.6 | 91.5  |
DoRA, (IA)^3 and prefix tuning have no number in that table (jaxft column only).

Settings here (not the paper's per-task tuned ones, which train 25-80 epochs at batch 16 with
max length 512): AdamW, linear decay after 6% warmup, batch 32, max length 128, 3 epochs on SST-2
and 10 on the four small tasks, one learning rate per method (METHODS below, set as
peft.learning_rate, which the head follows too; these multi-epoch rates are lower than the
one-epoch defaults of jaxft.peft.methods; full fine-tuning uses the glue_small rates as
train.learning_rate). The task head always trains.

Grid "cpu": each method on MR for one epoch (the quickstart's data and schedule,
jaxft.config.movie_reviews_cpu) at its GLUE row's learning rate. Expected (2-core CPU VM, seed 0,
2026-11-30; the accuracies are those of 2026-11-27 to the last digit, the runs are deterministic):
| row | trainable | % | accuracy | train examples/s |
| full | 22,713,986 | 100.00 | 84.25 | 57.8 |
| bitfit | 26,882 | 0.12 | 75.94 | 90.7 |
| adapter_h8 | 79,202 | 0.35 | 77.92 | 84.4 |
| lora | 74,498 | 0.33 | 78.77 | 85.6 |
| dora | 79,106 | 0.35 | 79.06 | 86.3 |
| ia3 | 9,986 | 0.04 | 78.02 | 90.4 |
| prefix | 74,498 | 0.33 | 72.26 | 89.2 |
"""

from jaxft.config import base_config, movie_reviews_cpu

GLUE_TASKS = ("sst2", "mrpc", "cola", "rte", "stsb")
TASKS = GLUE_TASKS + ("mr",)  # "mr": the CPU-sized rows (grid "cpu")
METRIC = {"sst2": "accuracy", "mrpc": "accuracy", "cola": "mcc", "rte": "accuracy",
          "stsb": "pearson", "mr": "accuracy"}

# row name -> (peft.method, extra peft fields, learning rate: peft.learning_rate, or for full
# train.learning_rate)
METHODS = {
    "full": ("full", {}, None),
    "bitfit": ("bitfit", {}, 1e-3),
    "adapter_h8": ("adapter_houlsby", {"adapter_size": 8}, 3e-4),
    "adapter_h24": ("adapter_houlsby", {"adapter_size": 24}, 3e-4),
    "lora": ("lora", {"lora_rank": 8, "lora_alpha": 8.0}, 5e-4),
    "dora": ("dora", {"lora_rank": 8, "lora_alpha": 8.0}, 5e-4),
    "ia3": ("ia3", {}, 3e-3),
    "prefix": ("prefix", {"prefix_length": 16}, 5e-3),
}

# MPNet names its attention projections attn/{q,k,v,o}; BERT-likes use query/key/value + dense.
_MPNET_TARGETS = {"lora_targets": r"attn/(q|v)$", "ia3_targets": r"attn/(k|v|o)$|/output/dense$"}

# LoRA paper, Table 2 (RoBERTa-base, GLUE dev), x100 in each task's METRIC: {(row, metric): value}
# with rows "<method>-<task>" of the "paper" grid.
_LORA_TABLE_2 = {
    "full": {"sst2": 94.8, "mrpc": 90.2, "cola": 63.6, "rte": 78.7, "stsb": 91.2},
    "bitfit": {"sst2": 93.7, "mrpc": 92.7, "cola": 62.0, "rte": 81.5, "stsb": 90.8},
    "adapter_h8": {"sst2": 94.2, "mrpc": 88.5, "cola": 60.8, "rte": 71.5, "stsb": 89.7},
    "adapter_h24": {"sst2": 94.7, "mrpc": 88.4, "cola": 62.6, "rte": 75.9, "stsb": 90.3},
    "lora": {"sst2": 95.1, "mrpc": 89.7, "cola": 63.4, "rte": 86.6, "stsb": 91.5},
}
PAPER = {(f"{m}-{t}", METRIC[t]): v for m, row in _LORA_TABLE_2.items() for t, v in row.items()}

# For `jaxft table`: the grids (row -> get_config arg).
GRIDS = {
    "paper": {f"{m}-{t}": f"{m}:{t}" for m in METHODS for t in GLUE_TASKS},
    "cpu": {m: f"{m}:mr" for m in ("full", "bitfit", "adapter_h8", "lora", "dora", "ia3", "prefix")},
}
METRICS = {grid: {"trainable params": "trainable_params", "trainable %": "trainable_percent",
                  "train examples/s": "train_examples_per_s"} for grid in GRIDS}


def get_config(arg=None):
  method, _, rest = (arg or "lora:sst2").partition(":")
  task, _, model = rest.partition(",")
  if method not in METHODS:
    raise ValueError(f"peft_table: unknown method {method!r}; choose one of {', '.join(METHODS)}")
  if task not in TASKS:
    raise ValueError(f"peft_table: unknown task {task!r}; choose one of {', '.join(TASKS)} "
                     "(arg is '<method>:<task>[,<model>]')")
  c = base_config()
  c.model.name = model or "minilm-l6"
  c.data.name = task
  c.data.max_length = 128
  c.train.batch_size = 32
  c.train.num_epochs = 3.0 if task == "sst2" else 10.0
  c.train.warmup_ratio = 0.06
  c.train.schedule = "linear"
  if task == "mr":  # the CPU-sized row: MR, one epoch (jaxft.config.movie_reviews_cpu)
    movie_reviews_cpu(c)
  peft_method, fields, lr = METHODS[method]
  c.peft.method = peft_method
  for k, v in fields.items():
    c.peft[k] = v
  if c.model.name == "mpnet-base":
    for k, v in _MPNET_TARGETS.items():
      c.peft[k] = v
  if lr is None:  # full fine-tuning: the glue_small rates
    c.train.learning_rate = 1e-4 if c.model.name == "minilm-l6" else 2e-5
  else:  # PEFT leaves and the head train at it (jaxft.train.optim.learning_rates)
    c.peft.learning_rate = lr
  return c
