"""`make demo` (examples/demo.py) end to end on a tiny local model: vLLM's output goes to OUT/vllm.log, each
engine is shut down before the next starts, and the verdict is the last line the demo prints."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from factory import build_model
from test_plugin_engine import vllm_env

DEMO = Path(__file__).resolve().parent.parent / "examples" / "demo.py"
VERDICT = re.compile(r"^(\d)/3 prompts generate the same greedy text from both checkpoints$")


@pytest.mark.vllm
def test_demo_ends_with_its_verdict(tmp_path):
    model = build_model(tmp_path / "float", "llama")
    out = tmp_path / "demo-out"
    # stderr into stdout, as on a terminal: the order of the two is what the user sees.
    proc = subprocess.run(["flock", "/tmp/vllm-engine.lock", sys.executable, str(DEMO), "--model", str(model),
                           "--out", str(out), "--nsamples", "4", "--seqlen", "64", "--max-tokens", "8"],
                          env=vllm_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    log = (out / "vllm.log").read_text() if (out / "vllm.log").exists() else ""
    assert proc.returncode == 0, proc.stdout[-4000:] + log[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    # Nothing of vLLM's reaches the terminal: no log lines, no shutdown messages after the verdict.
    assert not [line for line in lines if re.search(r"\b(INFO|WARNING|DEBUG)\b|\[shutdown\]", line)], proc.stdout
    match = VERDICT.match(lines[-1])
    assert match and match.group(1) == "3", lines[-10:]
    # Both engines ran, and each was shut down while the demo ran (at exit, the main process would have
    # logged its "send sigterm" to the terminal, after the verdict).
    assert log.count("send sigterm to process EngineCore") == 2, log[-4000:]
