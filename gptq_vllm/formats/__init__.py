"""The one definition of every quantized-weight format and layout (pure PyTorch, CPU and GPU).

Modules: bitpack (b-bit bitstreams), gptq (checkpoint tensors, v1/v2 zeros, the canonical
QuantizedWeight), act_order (g_idx and its permutation), marlin and exllama (kernel layouts),
compressed_tensors (pack-quantized), reference (dequantize and the reference matmul), quant_config (every
config dialect, parsed once), validate (every checkpoint invariant, checked once).
"""

from . import act_order, bitpack, compressed_tensors, exllama, gptq, marlin, reference
from .errors import FormatError, ZeroFormatError
from .gptq import GPTQTensors, QuantizedWeight, ZeroFormat

__all__ = [
    "act_order",
    "bitpack",
    "compressed_tensors",
    "exllama",
    "gptq",
    "marlin",
    "reference",
    "FormatError",
    "ZeroFormatError",
    "GPTQTensors",
    "QuantizedWeight",
    "ZeroFormat",
]
