"""Errors raised when tensors do not match the format they claim."""


class FormatError(ValueError):
    """A tensor or config does not describe a valid quantized weight; the message names what and why."""


class ZeroFormatError(FormatError):
    """The zero-point convention (GPTQ v1 stores z-1, v2 stores z) is unusable or contradicts the data."""
