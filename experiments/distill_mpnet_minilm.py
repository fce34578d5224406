"""Task-specific distillation: a fine-tuned MPNet-base teacher (110M) into a 6-layer student.

    jaxft table experiments/distill_mpnet_minilm.py --seeds 3                # "paper": 5 GLUE tasks
    jaxft table experiments/distill_mpnet_minilm.py --grid cpu --seeds 1     # MR, one epoch
    # or by hand: 1. the teacher, fine-tuned and exported; 2. the student
    jaxft train --config experiments/distill_mpnet_minilm.py:sst2,teacher --workdir workdirs/sst2-mpnet
    jaxft export --workdir workdirs/sst2-mpnet --out workdirs/sst2-mpnet/export
    jaxft train --config experiments/distill_mpnet_minilm.py:sst2 --workdir workdirs/kd-minilm \
        --config.distill.teacher=workdirs/sst2-mpnet/export

Arg: "<task>[,<variant>]", task in sst2, mrpc, cola, rte, stsb, mr. Variants:
  (none)         MiniLM-L6 student of the teacher in distill.teacher, own WordPiece tokenizer:
                 logits only (sequence positions differ), teacher logits cached once;
  layers         DistilBERT-style student: MPNet layers 0, 2, ..., 10 of the teacher, plus the
                 TinyBERT (Jiao et al. 2020) terms: MSE of projected hidden states and of attention
                 maps, student layer i <- teacher layer 2i + 1;
  teacher        the MPNet-base teacher itself, fine-tuned (lr 2e-5; 5e-5 for the one-epoch mr);
  minilm         MiniLM-L6 fine-tuned on the labels alone (no teacher): the baseline, and the
                 teacher of the "half" students;
  half           a MiniLM-L3-size student made of the (MiniLM) teacher's layers 0, 2, 4, distilled;
  half_alone     the same student from the same initialisation on the labels only (alpha 1);
  half_tinybert  "half" plus the TinyBERT hidden-state and attention-map MSE (weight 1 each; the
                 teacher runs every step, as its hidden states are needed).
Loss (Hinton et al. 2015): alpha * CE + (1 - alpha) * T^2 * KL(teacher / T || student / T) with
alpha 0.5, T 2. The grids run each teacher first and export it (`From(row, "export")`).

Grid "cpu": MR for one epoch (jaxft.config.movie_reviews_cpu); each row's best checkpoint is then
timed over the validation split (inference examples/s, best of 3 passes). Expected (2-core CPU VM,
seed 0, 2026-12-01; accuracy %; examples/s vary about +-9% between runs of one architecture):
| row | params | accuracy | inference examples/s |
| minilm (MiniLM-L6, labels only; the teacher of the half students) | 22.7M | 84.25 | 159 |
| half_alone | 17.4M | 82.36 | 268 |
| half | 17.4M | 82.92 | 296 |
| half_tinybert | 17.4M | 81.70 | 319 |
| mpnet (MPNet-base fine-tuned, lr 5e-5) | 109.5M | 91.32 | 24 |
| minilm-kd-mpnet | 22.7M | 84.72 | 170 |
| l3-alone (MiniLM-L6 layers 0, 2, 4, labels only) | 17.4M | 80.28 | 316 |
| l3-kd-mpnet | 17.4M | 80.94 | 319 |

Published numbers (../shared/REFERENCES.md; BERT-base teachers, GLUE dev):
| model                       | SST-2 | MRPC | CoLA | RTE  | STS-B | note |
| BERT-base (DistilBERT paper) | 92.7 | 88.6 | 56.3 | 69.3 | 89.0 | teacher |
| DistilBERT (6 layers)        | 91.3 | 87.5 | 51.3 | 59.9 | 86.9 | GLUE 77.0 vs 79.5: 97% kept, 40% fewer params |
| MiniLM-L6-H384 (fine-tuned)  | 91.5 | 88.9 | 47.5 | 68.8 | -    | MiniLM README |
TinyBERT4 keeps 96.8% of BERT-base at 7.5x smaller. Expect the distilled MiniLM to land at or a
little above its plain fine-tuned number (the "<task>-minilm" rows).
"""

from jaxft.config import base_config, movie_reviews_cpu
from jaxft.harness.grid import From, Row

GLUE_TASKS = ("sst2", "mrpc", "cola", "rte", "stsb")
TASKS = GLUE_TASKS + ("mr",)  # "mr": the CPU-sized rows (grid "cpu")
VARIANTS = ("", "layers", "teacher", "minilm", "half", "half_alone", "half_tinybert")


def _student(arg: str, teacher_row: str, overrides=None, evaluate=None) -> Row:
  return Row(arg, {"distill.teacher": From(teacher_row, "export"), **(overrides or {})},
             evaluate=evaluate)


# The CPU rows' inference speed: after training, the best checkpoint's forward over the 1,060
# validation snippets, best of 3 timed passes (jaxft.train.evaluate.inference_speed).
SPEED = {"speed_passes": 3}

# For `jaxft table`: the grids (row -> get_config arg or Row); a student row follows its teacher.
GRIDS = {
    "paper": {row: value for t in GLUE_TASKS for row, value in (
        (f"{t}-teacher", f"{t},teacher"),
        (f"{t}-minilm", f"{t},minilm"),
        (t, _student(t, f"{t}-teacher")),
        (f"{t}-layers", _student(f"{t},layers", f"{t}-teacher")))},
    "cpu": {
        "minilm": Row("mr,minilm", evaluate=SPEED),
        "half_alone": _student("mr,half_alone", "minilm", evaluate=SPEED),
        "half": _student("mr,half", "minilm", evaluate=SPEED),
        "half_tinybert": _student("mr,half_tinybert", "minilm", evaluate=SPEED),
        "mpnet": Row("mr,teacher", evaluate=SPEED),
        "minilm-kd-mpnet": _student("mr", "mpnet", evaluate=SPEED),
        "l3-alone": Row("mr,minilm", {"model.keep_layers": "0,2,4"}, evaluate=SPEED),
        "l3-kd-mpnet": _student("mr", "mpnet", overrides={"model.keep_layers": "0,2,4"},
                                evaluate=SPEED),
    },
}
PAPER = {  # DistilBERT paper, GLUE dev (DistilBERT student of BERT-base)
    ("sst2", "accuracy"): 91.3, ("mrpc", "f1"): 87.5, ("cola", "mcc"): 51.3,
    ("rte", "accuracy"): 59.9, ("stsb", "pearson"): 86.9,
}
METRICS = {"paper": {"params": "total_params"},
           "cpu": {"params": "total_params",
                   "inference examples/s": "eval_validation_best/inference/examples_per_s"}}


def get_config(arg=None):
  task, _, variant = (arg or "sst2").partition(",")
  if task not in TASKS:
    raise ValueError(f"distill_mpnet_minilm: unknown task {task!r}; choose one of {', '.join(TASKS)}")
  if variant not in VARIANTS:
    raise ValueError(f"distill_mpnet_minilm: unknown variant {variant!r}; use '<task>' or "
                     "'<task>,<variant>' with variant one of "
                     f"{', '.join(v for v in VARIANTS if v)}")
  c = base_config()
  c.data.name = task
  c.data.max_length = 128
  c.train.batch_size = 32
  c.train.num_epochs = 5.0 if task == "mrpc" else 3.0
  c.train.warmup_ratio = 0.1
  c.distill.teacher = ""  # required: the fine-tuned teacher (--config.distill.teacher=...)
  c.distill.alpha = 0.5
  c.distill.temperature = 2.0
  c.distill.layer_map = "uniform"
  if task == "mr":  # the CPU-sized rows (jaxft.config.movie_reviews_cpu)
    movie_reviews_cpu(c)
  if variant in ("teacher", "minilm"):  # plain fine-tuning, no teacher
    c.model.name = "mpnet-base" if variant == "teacher" else "minilm-l6"
    c.train.learning_rate = {"teacher": 5e-5 if task == "mr" else 2e-5, "minilm": 1e-4}[variant]
    return c
  if variant in ("half", "half_alone", "half_tinybert"):
    c.model.name = "minilm-l6"  # student = teacher layers 0, 2, 4 (the teacher is a MiniLM-L6)
    c.distill.student_layers = "0,2,4"
    c.distill.own_tokenizer = False
    c.train.learning_rate = 1e-4
    if variant == "half_alone":
      c.distill.alpha = 1.0  # labels only: the KL term has weight 0
    if variant == "half_tinybert":
      c.distill.hidden_weight = 1.0
      c.distill.attention_weight = 1.0
      c.distill.cache_teacher_logits = False
    return c
  if variant == "layers":
    c.model.name = "mpnet-base"  # student family = teacher family, built from its layers
    c.distill.student_layers = "0,2,4,6,8,10"
    c.distill.hidden_weight = 1.0
    c.distill.attention_weight = 1.0
    c.distill.own_tokenizer = False
    c.distill.cache_teacher_logits = False
    c.train.learning_rate = 5e-5
  else:
    c.model.name = "minilm-l6"
    c.distill.own_tokenizer = True
    c.distill.cache_teacher_logits = True
    c.train.learning_rate = 1e-4
  return c
