"""Packaging: imports without vLLM, the console script, the vLLM plugin entry point."""

import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest
from click.testing import CliRunner

from converters.cli import main


def test_imports_without_vllm():
    # sys.modules["vllm"] = None makes any `import vllm` fail, as on a machine without vLLM.
    code = ("import sys; sys.modules['vllm'] = None\n"
            "import gptq_vllm, converters, gptq_vllm.formats, converters.cli\n"
            "assert not [m for m in sys.modules if m.startswith('vllm') and sys.modules[m] is not None]\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_help_lists_commands():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0, result.output
    for command in main.commands:
        assert command in result.output
        sub = CliRunner().invoke(main, [command, "--help"])
        assert sub.exit_code == 0, sub.output


def test_vllm_entry_point():
    eps = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "mygptq"]
    assert len(eps) == 1 and eps[0].value == "gptq_vllm:register"


@pytest.mark.parametrize("given,built", [
    ("8.0;8.9;9.0", "8.0;8.9;9.0a"),
    ("9.0", "9.0a"),
    ("9.0+PTX 8.6", "9.0a;9.0+PTX;8.6"),
    ("8.0 8.6", "8.0;8.6"),
    ("9.0a;10.0", "9.0a;10.0"),
])
def test_cuda_arch_list_builds_hopper_as_sm90a(given, built):
    """setup.py and the JIT build compile 9.0 as 9.0a (the wgmma loop), keeping every other entry."""
    from gptq_vllm.kernels.build import with_sm90a

    assert with_sm90a(given) == built


def test_cuda_build_compiles_every_kernel_family_and_finds_cutlass_only_when_asked(tmp_path, monkeypatch):
    from gptq_vllm.kernels import build

    names = {os.path.relpath(p, build.CSRC) for p in build.sources()}
    assert {"ops.cpp", "device.cu", "marlin/marlin_gemm.cu", "exllama/exllama_gemm.cu", "hopper/hopper_gemm.cu"} <= names
    assert any(n.startswith("hopper/hopper_tile_") for n in names)
    # Two units of one file name in different family folders would collide in the JIT build's objects.
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "gemm.cu").write_text("")
    with pytest.raises(RuntimeError, match="unique across folders.*gemm.cu"):
        build.sources(str(tmp_path))
    # CUTLASS is a build dependency of the CUDA build only: without the package the error says what to install.
    monkeypatch.setattr(build.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match=r"pip install nvidia-cutlass==4\.2\.0\.0"):
        build.cutlass_include_dirs()
