"""GPTQ of MoE experts (Mixtral, Qwen2-MoE, Qwen3-MoE): routed Hessians, starved experts, per-expert checkpoints.

The tiny models starve two experts on purpose (factory.build_moe router_offsets): expert 5 never gets a
token, expert 4 only a few, so the RTN and shrink rules both run; which expert lands in which case on
which layer is read from the routing, never assumed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from converters.quantize import moe, pipeline
from converters.quantize.calibration import Calibration
from converters.quantize.capture import ModelShell
from converters.quantize.eval import load_model
from converters.quantize.moe_names import MIXTRAL_LEAVES, ExpertNames
from converters.quantize.pipeline import Job, quantize
from converters.quantize.rtn import rtn_quantize
from converters.quantize.solver import QuantSpec
from factory import build_moe
from gptq_vllm.formats import gptq
from gptq_vllm.formats.gptq import ZeroFormat
from gptq_vllm.formats.reference import dequantize

CPU = torch.device("cpu")
EXPERTS, NEVER, RARE = 6, 5, 4
SPEC = QuantSpec(4, 32, True, "static")


def calibration(n=16, t=64) -> Calibration:
    return Calibration(torch.randint(3, 259, (n, t), generator=torch.Generator().manual_seed(0)), {"test": True})


def _model(root: Path, arch: str) -> Path:
    return build_moe(root / arch, arch, experts=EXPERTS, router_offsets={NEVER: -20.0, RARE: -1.0})


def _stored(arch: str) -> tuple[str, tuple[str, str, str]]:
    """Per-expert checkpoint prefix (under model.layers.L) and leaf names of the Hub layout."""
    return ("block_sparse_moe", MIXTRAL_LEAVES) if arch == "mixtral" else ("mlp", ("gate_proj", "up_proj", "down_proj"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each architecture quantized once; the loop's Q of every module kept (spy on the pipeline's solve)."""
    root = tmp_path_factory.mktemp("moe")
    out = {}
    for arch in ("mixtral", "qwen2_moe", "qwen3_moe"):
        model = _model(root, arch)
        seen: dict[str, torch.Tensor] = {}
        solve = pipeline._solve_parts

        def spy(prefix, parts, H, job, rules, solve=solve, seen=seen):
            result = solve(prefix, parts, H, job, rules)
            seen.update({f"{prefix}.{n}": sol.dequantize() for n, sol in result.items()})
            return result

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(pipeline, "_solve_parts", spy)
            report = quantize(Job(model, root / f"{arch}-q", SPEC, overwrite=True, progress=False), calibration())
        out[arch] = (model, root / f"{arch}-q", report, seen)
    return out


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_routed_capture_is_exact_and_leaves_the_layer_output_unchanged(arch, tmp_path):
    shell = ModelShell(_model(tmp_path, arch), CPU)
    rows = calibration().rows
    X, calls = shell.capture([rows])
    layer = shell.load_layer(0)
    experts = moe.fused_experts(layer)
    assert list(experts) == ["mlp.experts"]
    m = experts["mlp.experts"]
    call = calls[rows.shape[0]][0]
    with torch.no_grad():
        plain = pipeline._forward(layer, X[0], call)

    # independent references: the block input (post-attention norm output) and the router's own top-k
    ref = {}
    hooks = [layer.post_attention_layernorm.register_forward_hook(lambda mod, a, y: ref.update(x=y.flatten(0, 1))),
             layer.mlp.gate.register_forward_hook(lambda mod, a, y: ref.update(index=y[2]))]
    caps = [moe.RoutedHessians(m, "gate_up_proj"), moe.RoutedHessians(m, "down_proj", set(range(EXPERTS)))]

    def capture(_module, args, kwargs):
        for c in caps:
            c.add(args, kwargs)

    hooks.append(m.register_forward_pre_hook(capture, with_kwargs=True))
    with torch.no_grad():
        captured = pipeline._forward(layer, X[0], call)
    for h in hooks:
        h.remove()
    assert torch.equal(captured, plain)

    counts = torch.bincount(ref["index"].flatten(), minlength=EXPERTS).tolist()
    assert caps[0].tokens == counts == caps[1].tokens
    assert sum(counts) == rows.numel() * 2  # top-2

    x, index = ref["x"], ref["index"]
    H_all = 2 * x.t() @ x / x.shape[0]
    sum_xxt = lambda t: t.t() @ t  # noqa: E731
    H_gate_up = []
    for e in range(EXPERTS):
        xe = x[(index == e).any(dim=-1)]
        gate, up = F.linear(xe, m.gate_up_proj[e]).chunk(2, dim=-1)
        gate_all, up_all = F.linear(x, m.gate_up_proj[e]).chunk(2, dim=-1)
        # Mixtral and the Qwen MoEs gate with SiLU
        torch.testing.assert_close(caps[1].routed[e].sum, sum_xxt(F.silu(gate) * up), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(caps[1].everyone[e].sum, sum_xxt(F.silu(gate_all) * up_all), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(caps[0].routed[e].sum, sum_xxt(xe), rtol=1e-5, atol=1e-5)
        H_gate_up.append(2 * sum_xxt(xe) / max(len(xe), 1))

    # the rule per expert: no token -> RTN, fewer than in_features -> shrink toward the all-token H, else routed
    names = ExpertNames("model.layers.0.mlp.experts", "model.layers.0.mlp.experts", _stored(arch)[1], False)
    solves = moe.expert_solves(m, names, "model.layers.0", "gate_up_proj", caps[0], H_all)
    n0 = m.gate_up_proj.shape[2]
    kinds = set()
    for s in solves:
        n = counts[s.expert]
        kinds.add(s.fallback)
        assert s.tokens == n
        if n == 0:
            assert s.fallback == "rtn" and s.H is None
        elif n < n0:
            assert s.fallback == "shrink"
            torch.testing.assert_close(s.H, (n * H_gate_up[s.expert] + n0 * H_all) / (n + n0), rtol=1e-5, atol=1e-6)
        else:
            assert s.fallback is None
            torch.testing.assert_close(s.H, H_gate_up[s.expert], rtol=1e-5, atol=1e-6)
    assert kinds == {None, "rtn", "shrink"}  # every branch ran
    leaves = _stored(arch)[1]
    assert [p[0] for p in solves[1].parts] == [f"mlp.experts.1.{leaves[0]}", f"mlp.experts.1.{leaves[1]}"]


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_starved_experts_are_reported_and_rounded_or_shrunk(runs, arch):
    model, out, report, _ = runs[arch]
    stored, leaves = _stored(arch)
    tokens_per_layer = calibration().rows.numel()
    shrunk = 0
    for i, layer in enumerate(report["layers"]):
        summary = layer["experts"]["mlp.experts"]
        assert sum(summary["tokens"]) == 2 * tokens_per_layer
        assert summary["tokens"][NEVER] == 0 and NEVER in summary["rtn"]
        assert summary["rtn"] == [e for e, n in enumerate(summary["tokens"]) if n == 0]
        for k, leaf in enumerate(leaves):
            rec = layer["modules"][f"{stored}.experts.{NEVER}.{leaf}"]
            assert rec["fallback"] == "rtn" and rec["tokens"] == 0 and rec["loss"] is None
        for stage, threshold in (("gate_up_proj", 64), ("down_proj", 64)):  # build_moe: hidden = expert width = 64
            starved = [e for e, n in enumerate(summary["tokens"]) if 0 < n < threshold]
            assert summary["shrink"].get(stage, []) == starved
            shrunk += len(starved)
            for e in starved:
                assert layer["modules"][f"{stored}.experts.{e}.{leaves[2 if stage == 'down_proj' else 0]}"][
                    "fallback"] == "shrink"
        assert 0 < layer["rel_error"] < 0.5
        assert "float" not in layer
    assert shrunk > 0
    saved = json.loads((out / "quantize_report.json").read_text())
    assert saved["layers"][0]["experts"] == report["layers"][0]["experts"]


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_checkpoint_holds_per_expert_gptq_tensors_equal_to_the_loops_q(runs, arch):
    model, out, report, loop_q = runs[arch]
    stored, leaves = _stored(arch)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    prefix = "model.layers.0"
    for e in range(EXPERTS):
        for leaf in leaves:
            assert {f"{prefix}.{stored}.experts.{e}.{leaf}.{s}" for s in ("qweight", "qzeros", "scales", "g_idx")} \
                <= tensors.keys()
    assert f"{prefix}.{stored}.gate.weight" in tensors  # the router stays in float, under its Hub name
    assert not [k for k in tensors if "gate_up_proj" in k or k.endswith("experts.down_proj")]
    if arch == "qwen2_moe":
        assert f"{prefix}.mlp.shared_expert.gate_proj.qweight" in tensors
        assert f"{prefix}.mlp.shared_expert_gate.weight" in tensors
    experts = [m for m in loop_q if ".experts." in m]
    assert len(experts) == 2 * EXPERTS * 3
    for module, q in loop_q.items():  # the format core, independent of the quantizer's own reader
        t = gptq.GPTQTensors(*(tensors[f"{module}.{s}"] for s in ("qweight", "qzeros", "scales", "g_idx")))
        qw = gptq.unpack(t, SPEC.bits, SPEC.group_size, SPEC.sym, ZeroFormat.V1, q.shape[1], module)
        assert torch.equal(dequantize(qw).t(), q), module

    # eval's dequantized transformers model holds the same Q in the fused parameters
    qmodel, fmodel = load_model(out, CPU), load_model(model, CPU)
    assert set(qmodel.quantized_modules) == set(loop_q)
    state, float_state = qmodel.state_dict(), fmodel.state_dict()
    for i in range(2):
        gate_up = state[f"model.layers.{i}.mlp.experts.gate_up_proj"]
        down = state[f"model.layers.{i}.mlp.experts.down_proj"]
        for e in range(EXPERTS):
            name = f"model.layers.{i}.{stored}.experts.{e}"
            assert torch.equal(gate_up[e], torch.cat([loop_q[f"{name}.{leaves[0]}"], loop_q[f"{name}.{leaves[1]}"]]))
            assert torch.equal(down[e], loop_q[f"{name}.{leaves[2]}"])
        # the expert that saw no token is exactly round-to-nearest of its float weights
        w = float_state[f"model.layers.{i}.mlp.experts.down_proj"][NEVER]
        assert torch.equal(down[NEVER], dequantize(rtn_quantize(w, SPEC.bits, SPEC.group_size, SPEC.sym)).t())
        assert torch.equal(state[f"model.layers.{i}.mlp.gate.weight"], float_state[f"model.layers.{i}.mlp.gate.weight"])


def test_fused_expert_names_are_read_like_per_expert_ones(runs, tmp_path):
    model, _, _, _ = runs["mixtral"]
    # what a raw state-dict save of the transformers-5 model holds: fused experts, router under `mlp`
    fused = tmp_path / "fused"
    fused.mkdir()
    for f in model.iterdir():
        if f.suffix != ".safetensors":
            (fused / f.name).write_bytes(f.read_bytes())
    state = load_model(model, CPU, torch.float16).state_dict()
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file({k: v.contiguous() for k, v in state.items()}, str(fused / "model.safetensors"))
    a, b = ModelShell(model, CPU), ModelShell(fused, CPU)
    assert not a.experts["model.layers.0.mlp.experts"].fused and b.experts["model.layers.0.mlp.experts"].fused
    for la, lb in zip(a.load_layer(1).state_dict().items(), b.load_layer(1).state_dict().items()):
        assert la[0] == lb[0] and torch.equal(la[1], lb[1]), la[0]
    # RTN of the fused source writes experts per expert (under the fused module's prefix, Mixtral leaves)
    quantize(Job(fused, tmp_path / "rtn-fused", SPEC, method="rtn", overwrite=True, progress=False), None)
    quantize(Job(model, tmp_path / "rtn", SPEC, method="rtn", overwrite=True, progress=False), None)
    with safe_open(str(tmp_path / "rtn-fused" / "model.safetensors"), "pt") as f:
        assert "model.layers.1.mlp.experts.3.w2.qweight" in f.keys()
    qa, qb = load_model(tmp_path / "rtn", CPU).state_dict(), load_model(tmp_path / "rtn-fused", CPU).state_dict()
    assert qa.keys() == qb.keys() and all(torch.equal(qa[k], qb[k]) for k in qa)


def test_eval_rounds_experts_to_nearest_for_its_baseline(runs):
    from transformers import AutoTokenizer

    from converters.quantize import eval as qeval
    from factory import TOKENIZER_TEXT

    model, out, _, _ = runs["mixtral"]
    base, quant = load_model(model, CPU), load_model(out, CPU)
    layer = base.model.layers[0]
    rtn = qeval._rtn_layer(layer, "model.layers.0", quant.quantized_modules, quant.expert_names)
    round_ = lambda w: dequantize(rtn_quantize(w, SPEC.bits, SPEC.group_size, SPEC.sym)).t()  # noqa: E731
    for e in range(EXPERTS):
        gate, up = layer.mlp.experts.gate_up_proj[e].chunk(2)
        assert torch.equal(rtn.mlp.experts.gate_up_proj[e], torch.cat([round_(gate), round_(up)]))
        assert torch.equal(rtn.mlp.experts.down_proj[e], round_(layer.mlp.experts.down_proj[e]))
    report = qeval.layer_report(base, quant, AutoTokenizer.from_pretrained(model), TOKENIZER_TEXT * 20, 64, 4)
    assert all(0 < r["error"] < r["rtn_error"] for r in report)  # GPTQ beats RTN on every layer
