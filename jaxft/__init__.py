"""jaxft: fine-tuning pretrained transformer encoders in JAX/Flax."""

import logging as _logging

__version__ = "0.1.0"


class _NoTorchAdvisory(_logging.Filter):
  """Drops transformers' import-time "PyTorch was not found" advisory: jaxft uses transformers for
  tokenizers and configs only, so a machine without torch is the normal case, not a problem.
  Every other transformers message passes."""

  def filter(self, record: _logging.LogRecord) -> bool:
    return not str(record.msg).startswith("PyTorch was not found")


# On the library's root logger before transformers is first imported (anywhere in jaxft).
_logging.getLogger("transformers").addFilter(_NoTorchAdvisory())
