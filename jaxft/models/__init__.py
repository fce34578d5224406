"""Flax ports of BERT, RoBERTa, DistilBERT, ELECTRA, MPNet, ModernBERT and ViT with Hugging Face
checkpoint import/export (see pretrained.py) and numerical parity with transformers' PyTorch
classes."""

from jaxft.models.outputs import ModelOutput
from jaxft.models.pretrained import Model, from_pretrained, init_random
from jaxft.models.registry import supported

__all__ = ["Model", "ModelOutput", "from_pretrained", "init_random", "supported"]
