"""gptq-vllm: GPTQ formats, the `mygptq` vLLM quantization plugin and its kernels.

Importing this package never imports vLLM or touches CUDA; `register()` (the vllm.general_plugins
entry point) does the vLLM-facing registration, once per process.
"""

__version__ = "0.1.0"

_registered = False


def register() -> None:
    """Register the `mygptq` quantization config and our custom ops with vLLM (idempotent, no CUDA work)."""
    global _registered
    if _registered:
        return
    from .kernels import ops  # noqa: F401  (custom ops and their fake implementations)
    from . import config  # noqa: F401  (@register_quantization_config("mygptq"))

    _registered = True
