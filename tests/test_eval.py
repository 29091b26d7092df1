"""`gptq-convert eval`: the perplexity protocol, dequantized loading of every format, per-layer report."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from converters.quantize.calibration import build_calibration
from converters.quantize.eval import layer_report, load_model, perplexity
from converters.quantize.pipeline import Job, quantize
from converters.quantize.solver import QuantSpec
from factory import TOKENIZER_TEXT, build_model, write_gptq
from gptq_vllm.formats.gptq import ZeroFormat

CPU = torch.device("cpu")
TEXT = TOKENIZER_TEXT * 30


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("eval") / "float", "llama", hidden=128, intermediate=256)


def test_perplexity_follows_the_protocol(llama):
    tok = AutoTokenizer.from_pretrained(llama)
    model = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32).eval()
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    n = len(ids) // 64
    x = torch.tensor(ids[: n * 64]).view(n, 64)
    with torch.no_grad():
        logits = model(input_ids=x).logits
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
    ours = perplexity(load_model(llama, CPU), tok, TEXT, seqlen=64, batch_size=3)
    assert ours["windows"] == n and ours["tokens_scored"] == n * 63
    assert abs(ours["ppl"] - math.exp(nll / (n * 63))) < 1e-3 * ours["ppl"]


@pytest.mark.parametrize("desc_act,sym,fmt", [(True, True, ZeroFormat.V1), (False, False, ZeroFormat.V2)])
def test_gptq_checkpoints_load_dequantized(llama, tmp_path, desc_act, sym, fmt):
    write_gptq(llama, tmp_path / "q", 4, 64, sym, desc_act, fmt, reference_dir=tmp_path / "ref")
    ours = load_model(tmp_path / "q", CPU).state_dict()
    ref = load_model(tmp_path / "ref", CPU).state_dict()
    assert ours.keys() == ref.keys()
    for k in ref:
        assert torch.equal(ours[k].half(), ref[k].half()), k  # the reference is stored in fp16


def test_layer_report_gptq_below_rtn(llama, tmp_path):
    tok = AutoTokenizer.from_pretrained(llama)
    cal = build_calibration(tok, None, nsamples=32, seqlen=64)
    quantize(Job(llama, tmp_path / "q", QuantSpec(3, 64, True, "desc"), progress=False), cal)
    base, quant = load_model(llama, CPU), load_model(tmp_path / "q", CPU)
    rows = layer_report(base, quant, tok, TEXT, seqlen=64, nwindows=8)
    assert [r["layer"] for r in rows] == [0, 1]
    assert all(0 < r["error"] < r["rtn_error"] for r in rows)
