"""Task-specific distillation: a fine-tuned MPNet-base teacher (110M) into a 6-layer student.

    # 1. the teacher: fine-tune MPNet-base on the task and export it
    jaxft train --config experiments/glue_small.py:sst2,mpnet-base --workdir workdirs/sst2-mpnet
    # 2a. MiniLM-L6 student (own tokenizer: logit distillation, teacher logits cached once)
    jaxft train --config experiments/distill_mpnet_minilm.py:sst2 --workdir workdirs/kd-minilm \
        --config.distill.teacher=workdirs/sst2-mpnet/export
    # 2b. DistilBERT-style student: every other MPNet layer, plus TinyBERT hidden/attention transfer
    jaxft train --config experiments/distill_mpnet_minilm.py:sst2,layers --workdir workdirs/kd-mp6 \
        --config.distill.teacher=workdirs/sst2-mpnet/export

Arg: "<task>[,layers]", task in sst2, mrpc, cola, rte, stsb. Loss (Hinton et al. 2015):
alpha * CE + (1 - alpha) * T^2 * KL(teacher / T || student / T) with alpha 0.5, T 2; "layers" adds
the TinyBERT (Jiao et al. 2020) terms: MSE of projected hidden states and of attention maps, on
the uniform layer map (student layer i <- teacher layer 2i + 1) with the student initialised from
teacher layers 0, 2, ..., 10 (DistilBERT's initialisation, Sanh et al. 2019). The MiniLM student
uses its own WordPiece tokenizer, so only logits can be matched (sequence positions differ).

CPU-sized rows on MR (jaxft.config.movie_reviews_cpu: one epoch), with a fine-tuned MiniLM-L6
teacher (experiments/quickstart.py, exported) and a MiniLM-L3-size student made of its layers
0, 2, 4: "mr,half" distils (alpha 0.5, T 2, teacher logits cached), "mr,half_alone" trains the
same student from the same initialisation on the labels only (alpha 1), "mr,half_tinybert" adds
the TinyBERT hidden-state and attention-map MSE terms (weight 1 each; student layer i <- teacher
layer 2i + 1; the teacher runs every step, as its hidden states are needed).
    jaxft train --config experiments/distill_mpnet_minilm.py:mr,half --workdir workdirs/kd-l3 \
        --config.distill.teacher=workdirs/quickstart/export

Published numbers (../shared/REFERENCES.md; BERT-base teachers, GLUE dev):
| model                       | SST-2 | MRPC | CoLA | RTE  | STS-B | note |
| BERT-base (DistilBERT paper) | 92.7 | 88.6 | 56.3 | 69.3 | 89.0 | teacher |
| DistilBERT (6 layers)        | 91.3 | 87.5 | 51.3 | 59.9 | 86.9 | GLUE 77.0 vs 79.5: 97% kept, 40% fewer params |
| MiniLM-L6-H384 (fine-tuned)  | 91.5 | 88.9 | 47.5 | 68.8 | -    | MiniLM README |
TinyBERT4 keeps 96.8% of BERT-base at 7.5x smaller. Expect the distilled MiniLM to land at or a
little above its plain fine-tuned number (experiments/glue_small.py:<task>).
"""

from jaxft.config import base_config, movie_reviews_cpu

GLUE_TASKS = ("sst2", "mrpc", "cola", "rte", "stsb")
TASKS = GLUE_TASKS + ("mr",)  # "mr": the CPU-sized rows (experiments/cpu_tables.sh)
VARIANTS = ("", "layers", "half", "half_alone", "half_tinybert")
GRID = {f"{t}{v}": f"{t}{v}" for t in GLUE_TASKS for v in ("", ",layers")}
PAPER = {  # DistilBERT paper, GLUE dev (DistilBERT student of BERT-base)
    ("sst2", "accuracy"): 91.3, ("mrpc", "f1"): 87.5, ("cola", "mcc"): 51.3,
    ("rte", "accuracy"): 59.9, ("stsb", "pearson"): 86.9,
}


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
  c.data.data_dir = "../shared/data/glue"
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
