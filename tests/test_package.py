"""Packaging: imports without vLLM, the console script, the vLLM plugin entry point."""

import os
import re
import subprocess
import sys
from importlib.metadata import entry_points

import click
import pytest
from click.testing import CliRunner

from converters.cli import main


def test_imports_without_vllm():
    # sys.modules["vllm"] = None makes any `import vllm` fail, as on a machine without vLLM.
    code = ("import sys; sys.modules['vllm'] = None\n"
            "import gptq_vllm, converters, gptq_vllm.formats, converters.cli\n"
            "assert not [m for m in sys.modules if m.startswith('vllm') and sys.modules[m] is not None]\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_help_lists_commands_and_explains_every_option():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0, result.output
    for name, command in main.commands.items():
        assert name in result.output
        # The summary is whole: click cuts long first sentences with "...".
        assert command.short_help and not command.get_short_help_str(limit=200).endswith("..."), name
        assert f"{command.short_help.split()[0]}" in result.output
        sub = CliRunner().invoke(main, [name, "--help"])
        assert sub.exit_code == 0, sub.output
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help, f"{name} {param.opts[0]} has no help"
    commands = result.output.split("Commands:")[1]
    assert not [line for line in commands.splitlines() if line.rstrip().endswith("...")], result.output


def test_quantize_into_an_existing_directory_is_one_line(tmp_path):
    model, out = tmp_path / "model", tmp_path / "out"
    model.mkdir()
    out.mkdir()
    result = CliRunner().invoke(main, ["quantize", str(model), str(out)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip() == f"Error: {out}: already exists (pass --overwrite to replace it)"


def test_make_demo_takes_the_readme_model_variable():
    """README: `make demo MODEL=path/to/float/model`."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    dry = subprocess.run(["make", "-n", "-C", root, "demo", "MODEL=/some/float-model"], capture_output=True,
                         text=True, check=True).stdout
    assert "examples/demo.py --model /some/float-model " in dry


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


def test_every_hopper_config_has_its_own_units():
    """configs.h's X(id, W, T, C, S) lines and the hopper_tile_<name>.cu (4/8 bit) and hopper_units_<name>.cu (2/3
    bit) units match one to one: a config without its unit would only fail at link time on a GPU build."""
    from gptq_vllm.kernels import build

    hopper = os.path.join(build.CSRC, "hopper")
    text = open(os.path.join(hopper, "configs.h")).read()
    configs = re.findall(r"X\((\d+), (\d+), (\d+), (\d+), (coop|pp)\)", text)
    assert [int(c[0]) for c in configs] == list(range(len(configs))) and len(configs) >= 12
    for prefix, macro in (("hopper_tile_", "GPTQ_HOPPER_INSTANTIATE"), ("hopper_units_", "GPTQ_HOPPER_INSTANTIATE_UNITS")):
        units = {}
        for name in os.listdir(hopper):
            if name.startswith(prefix):
                ids = re.findall(rf"^{macro}\((\d+)\)", open(os.path.join(hopper, name)).read(), re.M)
                units[name] = [int(i) for i in ids]
        expected = {f"{prefix}{w}x{t}_c{c}{'_pp' if s == 'pp' else ''}.cu": [int(i)] for i, w, t, c, s in configs}
        assert units == expected, prefix


def test_cuda_build_compiles_every_kernel_family_and_finds_cutlass_only_when_asked(tmp_path, monkeypatch):
    from gptq_vllm.kernels import build

    names = {os.path.relpath(p, build.CSRC) for p in build.sources()}
    assert {"ops.cpp", "device.cu", "marlin/marlin_gemm.cu", "exllama/exllama_gemm.cu", "hopper/hopper_gemm.cu"} <= names
    assert any(n.startswith("hopper/hopper_tile_") for n in names) and any(n.startswith("hopper/hopper_units_") for n in names)
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
