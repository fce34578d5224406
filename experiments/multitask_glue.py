"""Multitask GLUE on a CPU: one MiniLM-L6 encoder, a head per task, tasks sampled by temperature.

    jaxft train --config experiments/multitask_glue.py:mrpc,rte --workdir workdirs/mt-mrpc-rte
    jaxft train --config experiments/multitask_glue.py:mrpc,rte,stsb/3 --workdir workdirs/mt-3
    jaxft table experiments/multitask_glue.py --grid cpu --seeds 3        # 300 steps a row
    jaxft table experiments/multitask_glue.py --grid cpu --seeds 3 --only mrpc+rte --metric rte/accuracy
    jaxft table experiments/multitask_glue.py --seeds 3                   # "paper": 3 epochs

Arg: "<task>,<task>[,...][/<T>]": GLUE tasks (the data root's glue/: cola, sst2, mrpc, rte, stsb)
trained together (jaxft.recipes.multitask), each step one task's batch of 32, task i drawn with
p_i ~ n_i^(1/T) (T = 1: by training-set size, the default; T = 3: flatter). 300 steps of MiniLM-L6
(lr 1e-4, warmup 10%, max length 128), an eval of every task every 100 steps with its own head.
Reported: "average", the mean of the tasks' main metrics (MRPC F1, RTE accuracy, STS-B Pearson,
CoLA MCC, SST-2 accuracy), and per task "<task>/<metric>" (--metric). A few hundred steps on two
CPU cores take minutes per row (grid "cpu"); grid "paper" is the full-length comparison with
single-task fine-tuning (experiments/glue_small.py): the same rows for 3 epochs, evaluated once
per epoch. Data: the GLUE TSVs under the data root ($JAXFT_DATA or ../shared/data).

Expected: not measured on this project's machines yet; the cpu grid's numbers go to
docs/results.md when it runs (`--publish`, then `jaxft table --docs`).
No published numbers are a parity target for these short CPU rows (MT-DNN, Liu et al. 2019, and
Raffel et al. 2020 train BERT/T5-sized models to convergence), so PAPER is empty.
"""

from jaxft.config import base_config
from jaxft.harness.grid import Row

TASKS = ("cola", "sst2", "mrpc", "rte", "stsb")

# For `jaxft table`: row -> get_config arg (or Row).
_ROWS = {
    "mrpc+rte": "mrpc,rte",
    "mrpc+rte+stsb": "mrpc,rte,stsb",
    "mrpc+rte+stsb-T3": "mrpc,rte,stsb/3",
    "sst2+mrpc+rte-T3": "sst2,mrpc,rte/3",  # SST-2 is 20x MRPC: T = 3 keeps the small ones in
}
_THREE_EPOCHS = {"train.num_steps": 0, "train.num_epochs": 3.0, "train.eval_every": 0}
GRIDS = {
    "paper": {row: Row(arg, _THREE_EPOCHS) for row, arg in _ROWS.items()},
    "cpu": dict(_ROWS),
}
PAPER = {}


def get_config(arg=None):
  tasks, _, temperature = (arg or "mrpc,rte").partition("/")
  names = [t.strip() for t in tasks.split(",") if t.strip()]
  unknown = [t for t in names if t not in TASKS]
  if not names or unknown:
    raise ValueError(f"multitask_glue: unknown task(s) {unknown or names}; choose from "
                     f"{', '.join(TASKS)}, comma-separated, e.g. mrpc,rte or mrpc,rte,stsb/3")
  c = base_config()
  c.model.name = "minilm-l6"
  c.multitask.tasks = ",".join(names)
  c.multitask.temperature = float(temperature) if temperature else 1.0
  c.data.max_length = 128
  c.data.bucket_boundaries = "32,64,128"
  c.train.batch_size = 32
  c.train.num_steps = 300
  c.train.learning_rate = 1e-4  # what the MiniLM authors used for small models
  c.train.warmup_ratio = 0.1
  c.train.eval_every = 100
  c.train.log_every = 20
  return c
