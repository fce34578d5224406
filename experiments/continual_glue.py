"""Continual GLUE on a CPU: SST-2, then MRPC, then RTE on one MiniLM-L6 encoder, a head per task,
with plain sequential fine-tuning, experience replay or EWC against forgetting.

    jaxft train --config experiments/continual_glue.py:sst2,mrpc,rte/replay --workdir workdirs/cl
    jaxft table experiments/continual_glue.py --grid cpu --seeds 3                      # average
    jaxft table experiments/continual_glue.py --grid cpu --seeds 3 --no-run --metric average_forgetting
    jaxft table experiments/continual_glue.py --seeds 3                # "paper": 1,000-step stages

Arg: "<task>,<task>[,...]/<method>": GLUE tasks (from the data root's glue/) in training order
(jaxft.recipes.continual), 150 steps of batch 32 each (a fresh AdamW per stage: lr 1e-4, warmup
10%, max length 128), and the method:
  finetune   nothing against forgetting (the lower bound);
  replay     20% of the steps of stage k train on a batch of an earlier task, from a memory of its
             first 8 batches (256 examples per task);
  ewc        EWC (Kirkpatrick et al. 2017), lambda = 1e4 (not tuned), the empirical Fisher
             diagonal over 256 training examples of each finished task.
Every stage ends with an eval of the tasks seen so far, each with its own head. results.json
"continual" holds the matrix R[k][j] (task j's main metric after stage k: SST-2 accuracy, MRPC F1,
RTE accuracy), the average accuracy A = mean_j R[K-1][j] and the average forgetting
F = mean_{j<K-1} (max_{l<K-1} R[l][j] - R[K-1][j]) (Chaudhry et al. 2018); "eval" carries A and F
for --metric, and "average" (A, the rows' main metric).

Grid "cpu" is those 150-step stages; "paper" the same methods with 1,000-step stages (about 10
epochs of MRPC and RTE, half an epoch of SST-2), sized for an accelerator.
Expected: not measured on this project's machines yet; the cpu grid's numbers go to
docs/results.md when it runs (`--publish`, then `jaxft table --docs`).
No published numbers are a parity target for these CPU rows (continual-learning papers on text
use other task sequences and models), so PAPER is empty.
"""

from jaxft.config import base_config
from jaxft.harness.grid import Row

TASKS = ("cola", "sst2", "mrpc", "rte", "stsb")
METHODS = ("finetune", "replay", "ewc")

# For `jaxft table`: row -> get_config arg (or Row).
GRIDS = {
    "paper": {m: Row(f"sst2,mrpc,rte/{m}", {"continual.steps_per_task": 1000}) for m in METHODS},
    "cpu": {m: f"sst2,mrpc,rte/{m}" for m in METHODS},
}
PAPER = {}


def get_config(arg=None):
  tasks, _, method = (arg or "sst2,mrpc,rte/finetune").partition("/")
  names = [t.strip() for t in tasks.split(",") if t.strip()]
  unknown = [t for t in names if t not in TASKS]
  if not names or unknown:
    raise ValueError(f"continual_glue: unknown task(s) {unknown or names}; choose from "
                     f"{', '.join(TASKS)} in training order, e.g. sst2,mrpc,rte/replay")
  method = method or "finetune"
  if method not in METHODS:
    raise ValueError(f"continual_glue: unknown method {method!r}; choose one of "
                     f"{', '.join(METHODS)}")
  c = base_config()
  c.model.name = "minilm-l6"
  c.continual.tasks = ",".join(names)
  c.continual.steps_per_task = 150
  if method == "replay":
    c.continual.replay = 0.2
    c.continual.memory_batches = 8
  elif method == "ewc":
    c.continual.ewc_lambda = 1e4
    c.continual.fisher_examples = 256
  c.data.max_length = 128
  c.data.bucket_boundaries = "32,64,128"
  c.train.batch_size = 32
  c.train.learning_rate = 1e-4
  c.train.warmup_ratio = 0.1
  c.train.eval_every = 0  # once per stage
  c.train.log_every = 20
  return c
