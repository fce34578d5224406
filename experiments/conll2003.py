"""CoNLL-2003 English NER (IOB1, entity-level F1 as conlleval/seqeval computes it).

    jaxft train --config experiments/conll2003.py --workdir workdirs/conll
    jaxft train --config experiments/conll2003.py:mpnet-base --workdir workdirs/conll-mpnet
    jaxft table experiments/conll2003.py --seeds 3                 # "paper": 3 epochs, 2 models
    jaxft table experiments/conll2003.py --grid cpu --seeds 1      # MiniLM-L6, one epoch

Arg: the model (default minilm-l6; mpnet-base trains at lr 3e-5). Data: conll2003/ under the data
root ($JAXFT_DATA or ../shared/data); trains on eng.train, evaluates on eng.testa (the dev set;
eng.testb is not shipped offline), scored over words (first sub-token) as conlleval does.

Expected, grid "cpu" (MiniLM-L6, lr 1e-4, batch 32, one epoch = 438 steps; 2-core CPU VM, seed 0,
2026-11-27, 6.2 min): entity F1 87.07 (precision 86.43, recall 87.71, token accuracy 97.62).
Published: BERT-base dev F1 96.4 / test 92.4 with document context (BERT paper); sentence-level
reproductions reach about 91-92.6 test F1. Neither is a like-for-like target (document context,
model size), so PAPER is empty.
"""

from jaxft.config import base_config
from jaxft.harness.grid import Row

# For `jaxft table`: the grids (row -> get_config arg or Row).
GRIDS = {
    "paper": {"minilm-l6": None, "mpnet-base": "mpnet-base"},
    "cpu": {"minilm-l6-1ep": Row(None, {"train.num_epochs": 1.0})},
}
PAPER = {}
METRICS = {grid: {"precision": "entity_precision", "recall": "entity_recall"} for grid in GRIDS}


def get_config(arg=None):
  c = base_config()
  c.model.name = arg or "minilm-l6"
  c.data.name = "conll2003"
  c.data.max_length = 128
  c.train.batch_size = 32
  c.train.num_epochs = 3.0
  c.train.learning_rate = 1e-4 if c.model.name == "minilm-l6" else 3e-5
  return c
