"""Model compression by quantization: int8 post-training weight quantization and fake-quant QAT."""

from jaxft.quant.int8 import (QTensor, QuantSpec, dequantize_params, quantize, quantize_params,
                              quantize_tree, quantized_apply, size_report)
from jaxft.quant.qat import fake_quant, fake_quant_params, qat_apply, qat_term

__all__ = ["QTensor", "QuantSpec", "dequantize_params", "quantize", "quantize_params",
           "quantize_tree", "quantized_apply", "size_report", "fake_quant", "fake_quant_params",
           "qat_apply", "qat_term"]
