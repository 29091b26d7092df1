"""QEP (quantization error propagation, converters/quantize/qep.py): the correction against an independent
least-squares solution, α = 0 against plain GPTQ bit for bit, the error it must remove on a 2-layer model,
the routed MoE cross term, and the MoE / asymmetric / lm_head / dynamic / CLI paths."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors.torch import load_file

from converters.cli import main
from converters.quantize import moe
from converters.quantize.calibration import Calibration
from converters.quantize.capture import ModelShell
from converters.quantize.eval import load_model
from converters.quantize.hessian import Hessian
from converters.quantize.pipeline import Job, quantize
from converters.quantize.qep import DEFAULT_ALPHA, QEP, target_shift
from converters.quantize.solver import QuantSpec, gptq_solve, hessian_factor
from factory import build_model, build_moe

CPU = torch.device("cpu")
ALL = lambda a: QEP(((r"", a),))  # noqa: E731


def rows(n: int, t: int = 64, seed: int = 0) -> Calibration:
    return Calibration(torch.randint(3, 259, (n, t), generator=torch.Generator().manual_seed(seed)), {"test": True})


def run(model: Path, out: Path, calib: Calibration, **kw) -> dict:
    return quantize(Job(model_dir=model, out_dir=out, overwrite=True, progress=False, **kw), calib)


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return build_model(tmp_path_factory.mktemp("qep") / "float", "llama", hidden=128, intermediate=256)


def _layer(seed: int, C: int = 48, R: int = 24, N: int = 600):
    """W [R, C], full-precision inputs X and perturbed inputs X̂ [C, N] (correlated channels)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(C, C, generator=g, dtype=torch.float64) / C**0.5
    X = mix @ torch.randn(C, N, generator=g, dtype=torch.float64)
    Xq = X + 0.3 * torch.randn(C, N, generator=g, dtype=torch.float64) * X.std(dim=1, keepdim=True)
    return torch.randn(R, C, generator=g, dtype=torch.float64), X, Xq


def _accumulate(X: torch.Tensor, Xq: torch.Tensor):
    acc = Hessian(X.shape[0], CPU, cross=True)
    for chunk in range(0, X.shape[1], 128):  # token rows, in batches like the pipeline
        acc.add(Xq[:, chunk:chunk + 128].t().float(), fp=X[:, chunk:chunk + 128].t().float())
    return acc.finalize().double(), acc.finalize_cross().double()


@pytest.mark.parametrize("seed,damp", [(0, 0.01), (1, 0.1)])
def test_corrected_target_is_the_damped_least_squares_solution(seed, damp):
    """W + W δX̂ᵀ Ĥ⁻¹ (Ĥ damped by λ) minimises ‖W X − Ŵ X̂‖² + λ' ‖Ŵ − W‖²; lstsq of the stacked system is
    an independent computation of that minimiser, and its orientation is the layer's y = W x."""
    W, X, Xq = _layer(seed)
    H, D = _accumulate(X, Xq)
    perm = torch.argsort(torch.diagonal(H), descending=True)
    rhs = target_shift(W, D, torch.ones(W.shape[0], dtype=torch.float64)).double()[:, perm]
    _, applied = hessian_factor(H, perm, damp, torch.float64, rhs)
    W_star = W + rhs[:, torch.argsort(perm)]

    N = X.shape[1]
    lam = applied * float(torch.diagonal(H).mean()) * N / 2  # H = 2/N X̂X̂ᵀ: damping in X̂X̂ᵀ's units
    A = torch.cat([Xq.t(), lam**0.5 * torch.eye(W.shape[1], dtype=torch.float64)])
    B = torch.cat([(W @ X).t(), lam**0.5 * W.t()])
    ref = torch.linalg.lstsq(A, B).solution.t()
    torch.testing.assert_close(W_star, ref, rtol=0, atol=1e-4 * float(ref.abs().max()))  # fp32 accumulation

    # quantizing the shifted rows is GPTQ of the reference target, and it beats plain GPTQ on ‖W X − Q X̂‖
    spec = QuantSpec(3, 16, True, "desc", damp=damp)
    qep = gptq_solve(W, H, spec, dtype=torch.float64, shift=target_shift(W, D, torch.ones(W.shape[0])))
    assert (qep.codes != gptq_solve(ref, H, spec, dtype=torch.float64).codes).float().mean() < 0.01
    plain = gptq_solve(W, H, spec, dtype=torch.float64)
    err = lambda sol: float((W @ X - sol.dequantize().double() @ Xq).norm())  # noqa: E731
    assert err(qep) < 0.9 * err(plain)


def test_alpha_scales_the_shift_and_zero_alpha_is_none():
    W, X, Xq = _layer(2)
    _, D = _accumulate(X, Xq)
    alpha = torch.tensor([0.0, 0.5] * (W.shape[0] // 2))
    shift = target_shift(W.float(), D, alpha)
    full = W.float() @ D.float()
    torch.testing.assert_close(shift, full * alpha.unsqueeze(1))
    assert target_shift(W.float(), D, torch.zeros(W.shape[0])) is None


def test_alpha_rules():
    assert QEP.parse_alpha([]) == DEFAULT_ALPHA
    rules = QEP.parse_alpha(["q_proj=1", "0.25"])
    assert rules == (("q_proj", 1.0), ("", 0.25))
    q = QEP(rules)
    assert q.alpha_for("model.layers.0.self_attn.q_proj") == 1.0
    assert q.alpha_for("model.layers.0.mlp.down_proj") == 0.25
    assert QEP(QEP.parse_alpha(["o_proj=0"])).alpha[-len(DEFAULT_ALPHA):] == DEFAULT_ALPHA
    for bad in (["2"], ["x"], ["0.1", "0.2"]):
        with pytest.raises(ValueError):
            QEP(QEP.parse_alpha(bad))


def test_alpha_zero_is_plain_gptq_bit_for_bit(llama, tmp_path):
    """The two-stream pipeline with α = 0 solves on exactly today's Hessians: the quantized stream is
    the same activations whatever the full-precision one does."""
    calib, spec = rows(8), QuantSpec(3, 64, False, "desc", mse=2.4)
    plain = run(llama, tmp_path / "plain", calib, spec=spec, lm_head=True)
    qep = run(llama, tmp_path / "qep", calib, spec=spec, lm_head=True, qep=ALL(0.0))
    a, b = load_file(tmp_path / "plain" / "model.safetensors"), load_file(tmp_path / "qep" / "model.safetensors")
    assert a.keys() == b.keys() and any(k.endswith(".qweight") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # layer 0 reads the same inputs in both streams: its error against the full-precision model is today's
    assert qep["layers"][0]["fp_error"] == pytest.approx(plain["layers"][0]["rel_error"], rel=1e-6)
    assert qep["qep"] == {"alpha": [["", 0.0]], "compare": False}


def _final_error(model_dir: Path, ref, ids: torch.Tensor) -> float:
    with torch.no_grad():
        out = load_model(model_dir, CPU)(input_ids=ids).logits
    return float((out - ref).norm() / ref.norm())


def test_qep_reduces_the_final_output_error_of_a_two_layer_model(llama, tmp_path):
    """2-bit: the propagated error is large; QEP must bring the model's logits closer to the float
    model's on held-out tokens (a wrong sign or orientation makes them worse)."""
    calib, held_out = rows(32), rows(8, seed=1).rows
    with torch.no_grad():
        ref = load_model(llama, CPU)(input_ids=held_out).logits
    spec = QuantSpec(2, 64, True, "desc")
    plain = run(llama, tmp_path / "plain", calib, spec=spec)
    qep = run(llama, tmp_path / "qep", calib, spec=spec, qep=QEP(compare=True))
    e_plain, e_qep = _final_error(tmp_path / "plain", ref, held_out), _final_error(tmp_path / "qep", ref, held_out)
    assert e_qep < 0.95 * e_plain, (e_qep, e_plain)
    last = qep["layers"][-1]
    assert last["fp_error"] < last["fp_error_without_qep"]
    assert "rel_error" in plain["layers"][-1] and "fp_error" not in plain["layers"][-1]


def test_routed_cross_term_pairs_each_experts_tokens_of_both_streams(tmp_path):
    shell = ModelShell(build_moe(tmp_path / "m", "mixtral", experts=4), CPU)
    layer = shell.load_layer(0)
    m = moe.fused_experts(layer)["mlp.experts"]
    g = torch.Generator().manual_seed(0)
    T, hidden = 96, m.gate_up_proj.shape[2]
    x = torch.randn(T, hidden, generator=g)
    fp = x + 0.1 * torch.randn(T, hidden, generator=g)
    index = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(T)])
    fp_gate_up = m.gate_up_proj + 0.01 * torch.randn(m.gate_up_proj.shape, generator=g)
    caps = [moe.RoutedHessians(m, st, fp_gate_up=fp_gate_up) for st in moe.STAGES]
    for c in caps:
        c.add((x, index, torch.ones(T, 2)), {}, fp=fp)
    for e in range(4):
        sel = (index == e).any(dim=-1)
        xe, fe = x[sel], fp[sel]
        gate, up = F.linear(xe, m.gate_up_proj[e]).chunk(2, dim=-1)
        fgate, fup = F.linear(fe, fp_gate_up[e]).chunk(2, dim=-1)
        xi, fi = F.silu(gate) * up, F.silu(fgate) * fup
        torch.testing.assert_close(caps[0].routed[e].cross, (fe - xe).t() @ xe, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(caps[1].routed[e].cross, (fi - xi).t() @ xi, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(caps[1].routed[e].sum, xi.t() @ xi, rtol=1e-5, atol=1e-5)


def test_moe_asym_lm_head_and_dynamic_run_with_qep(tmp_path):
    """Experts (routed inputs on both streams, starved ones uncorrected), the shared expert, asymmetric
    v1 grids, lm_head and a dynamic override all go through QEP; the correction moves routed experts."""
    arch = "qwen2_moe"
    model = build_moe(tmp_path / arch, arch, experts=6, router_offsets={5: -20.0, 4: -1.0})
    spec = QuantSpec(4, 32, False, "static")
    kw = dict(spec=spec, lm_head=True, dynamic={r"+:.*self_attn\.o_proj": {"bits": 8}})
    calib = rows(16)
    run(model, tmp_path / "plain", calib, **kw)
    report = run(model, tmp_path / "qep", calib, qep=QEP(((r"", 1.0),), compare=True), **kw)
    for layer in report["layers"]:
        assert 0 < layer["fp_error"] < layer["fp_error_without_qep"] * 1.05
    a, b = load_file(tmp_path / "plain" / "model.safetensors"), load_file(tmp_path / "qep" / "model.safetensors")
    experts = report["layers"][1]["experts"]["mlp.experts"]
    tokens = experts["tokens"]
    busy = max(range(6), key=lambda e: tokens[e])
    key = lambda e: f"model.layers.1.mlp.experts.{e}.gate_proj.qweight"  # noqa: E731
    assert not torch.equal(a[key(busy)], b[key(busy)])  # corrected
    for e in experts["rtn"]:
        assert torch.equal(a[key(e)], b[key(e)])  # no token: rounded to nearest in both runs
    assert not torch.equal(a["lm_head.qweight"], b["lm_head.qweight"])
    assert report["lm_head"]["damp"] is not None
    load_model(tmp_path / "qep", CPU)  # the checkpoint reads back


def test_cli_qep_options(llama, tmp_path, caplog):
    text = tmp_path / "calib.txt"
    text.write_text("The river ran past the mill and under the old stone bridge. " * 200)
    runner = CliRunner()
    caplog.set_level(logging.INFO, logger="converters.quantize.pipeline")
    base = ["quantize", str(llama), str(tmp_path / "q"), "--calib", str(text), "--nsamples", "4", "--seqlen", "64",
            "--bits", "3", "--mse", "0", "-q"]
    res = runner.invoke(main, base + ["--qep", "--qep-alpha", "down_proj=0.25", "--qep-alpha", "1", "--qep-compare",
                                      "-v"])
    assert res.exit_code == 0, res.output
    assert "against the full-precision model: mean" in res.stdout and "without the QEP correction" in res.stdout
    assert "full-precision model" in caplog.text and "(without QEP" in caplog.text  # per layer, both errors
    meta = json.loads((tmp_path / "q" / "quantize_config.json").read_text())["meta"]
    assert meta["qep"] == {"alpha": [["down_proj", 0.25], ["", 1.0]], "compare": True}
    for extra, message in ((["--qep-alpha", "0.5"], "need --qep"), (["--qep", "--qep-alpha", "1.5"], "[0, 1]"),
                           (["--qep", "--method", "rtn"], "--method gptq")):
        res = runner.invoke(main, base + extra + ["--overwrite"])
        assert res.exit_code == 2 and message in res.output, res.output
