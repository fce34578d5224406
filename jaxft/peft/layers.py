"""The PEFT hooks now live with the models that build with them: `jaxft.models.peft_layers`.

This name stays for code written against it.
"""

from jaxft.models.peft_layers import Adapter, Dense, PeftSpec, Prefix, Prompt, init_dora, init_pissa

__all__ = ["Adapter", "Dense", "PeftSpec", "Prefix", "Prompt", "init_dora", "init_pissa"]
