"""Offline tools: checkpoint readers and writers, the GPTQ quantizer and the `gptq-convert` CLI."""
