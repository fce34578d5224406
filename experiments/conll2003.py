"""CoNLL-2003 English NER (IOB1, entity-level F1 as conlleval/seqeval computes it).

    jaxft train --config experiments/conll2003.py --workdir workdirs/conll \
        --config.data.data_dir=../shared/data/conll2003
    jaxft train --config experiments/conll2003.py:mpnet-base --workdir workdirs/conll-mpnet ...

Trains on eng.train, evaluates on eng.testa (the dev set; eng.testb is not shipped offline).
Published: BERT-base dev F1 96.4 / test 92.4 with document context (BERT paper); sentence-level
reproductions reach about 91-92.6 test F1.
"""

from jaxft.config import base_config


def get_config(arg=None):
  c = base_config()
  c.model.name = arg or "minilm-l6"
  c.data.name = "conll2003"
  c.data.data_dir = "../shared/data/conll2003"
  c.data.max_length = 128
  c.train.batch_size = 32
  c.train.num_epochs = 3.0
  c.train.learning_rate = 1e-4 if c.model.name == "minilm-l6" else 3e-5
  return c
