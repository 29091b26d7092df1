"""`gptq-convert quantize`: the layer-by-layer driver (quantizer.md §8).

For each decoder layer, with only that layer materialized on the compute device:
  1. a probe forward finds the layer's linear modules and groups them by the input they read, in
     execution order: [q,k,v] [o] [gate,up] [down] for Llama-style layers, [q,k,v] [out] [fc1] [fc2]
     for OPT (true-sequential subsets, found rather than listed per architecture);
  2. a full forward with the float weights keeps the float outputs and accumulates the first group's
     Hessian; every later group gets a forward that stops right after its input was seen, so each group
     is calibrated on the outputs of the groups already quantized;
  3. each group is solved once: one Hessian for all the modules reading that input, their rows stacked
     (per quantization spec, when `dynamic` gives them different settings);
  4. a replay through the quantized layer gives the next layer's inputs, and the relative output error
     against the float outputs is logged;
  5. the layer's tensors are packed from the loop's codes and streamed to the checkpoint writer.
With QEP (qep.py) a second stream of activations, the full-precision model's, is carried beside the
quantized one: every group's input is computed on both (the full-precision pass with the layer's float
weights swapped in, one copy of the layer), Ĥ and the cross term come from the same pass, each group is
solved on its corrected target, and the output error is measured against the full-precision outputs.
MoE experts (transformers-5 fused parameters) join the groups as two pseudo-modules per experts module,
`experts.gate_up_proj` (reading the block input) and `experts.down_proj`, solved per expert against
routed Hessians (moe.py) and written per expert under the checkpoint's names (moe_names.py).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from gptq_vllm.formats.errors import FormatError
from gptq_vllm.kernels.selection import marlin_stored_problems

from ..checkpoint.emit import Target, module_tensors, quantization_config
from ..checkpoint.safetensors_dir import NON_WEIGHT_FILES
from ..checkpoint.writer import CheckpointWriter
from . import moe
from .calibration import Calibration
from .capture import ModelShell, StopForward
from .hessian import Hessian
from .moe_names import LEAVES, ExpertNames, split_fused
from .qep import QEP, target_shift
from .rtn import rtn_quantize
from .solver import QuantSpec, Solution, gptq_solve
from .targets import quantizable_module

log = logging.getLogger(__name__)

# MoE routers are linear layers whose outputs pick experts: they stay in float.
ROUTER = re.compile(r"(^|\.)(gate|router|shared_expert_gate)$")
DYNAMIC_KEYS = {"bits", "group_size", "sym", "desc_act"}  # what vLLM and our readers honour


@dataclass(frozen=True)
class Rule:
    """One GPTQModel-style `dynamic` entry: "-:regex" skips, "+:regex" (or plain regex) overrides."""

    pattern: re.Pattern
    skip: bool
    overrides: dict

    @staticmethod
    def parse(dynamic: dict | None) -> list["Rule"]:
        rules = []
        for key, value in (dynamic or {}).items():
            skip = key.startswith("-:")
            regex = key[2:] if key[:2] in ("-:", "+:") else key
            unknown = set(value or {}) - DYNAMIC_KEYS
            if unknown:
                raise ValueError(f"dynamic[{key!r}]: unsupported keys {sorted(unknown)}; use {sorted(DYNAMIC_KEYS)}")
            try:
                rules.append(Rule(re.compile(regex), skip, dict(value or {})))
            except re.error as e:
                raise ValueError(f"dynamic[{key!r}]: bad regex ({e})") from None
        return rules


def spec_for(module: str, base: QuantSpec, rules: list[Rule]) -> QuantSpec | None:
    """The spec of one module (full name without .weight), or None when it stays in float.

    First matching rule wins (GPTQModel and vLLM match with re.match, from the start of the name).
    desc_act: true means act_order "desc"; false keeps the base order unless it is "desc" ("static").
    """
    for rule in rules:
        if rule.pattern.match(module):
            if rule.skip:
                return None
            o = rule.overrides
            order = base.act_order
            if "desc_act" in o:
                order = "desc" if o["desc_act"] else ("static" if base.act_order == "desc" else base.act_order)
            return replace(base, bits=int(o.get("bits", base.bits)), group_size=int(o.get("group_size", base.group_size)),
                           sym=bool(o.get("sym", base.sym)), act_order=order)
    return base


@dataclass
class Job:
    model_dir: Path
    out_dir: Path
    spec: QuantSpec = field(default_factory=QuantSpec)
    target: Target = Target.GPTQ_V1
    dynamic: dict | None = None
    lm_head: bool = False
    method: str = "gptq"  # or "rtn": round-to-nearest, no calibration (the baseline)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype | None = None  # forward dtype; None: the checkpoint's on CUDA, float32 on CPU
    batch_size: int = 8  # calibration rows per forward
    overwrite: bool = False
    progress: bool = True
    qep: QEP | None = None  # quantization error propagation (qep.py); GPTQ only

    def module_spec(self, module: str, rules: list[Rule]) -> QuantSpec | None:
        spec = spec_for(module, self.spec, rules)
        if spec is not None and self.target is Target.GPTQ_V1 and not spec.sym:
            spec = replace(spec, min_zero=1)  # v1 stores z-1: a zero of 0 cannot be written
        return spec

    def tensors(self, weight, module: str) -> dict[str, torch.Tensor]:
        """One quantized module's tensors in the target format (mygptq: the default layout, which the
        config records and which holds every module's bits)."""
        if self.target is Target.MYGPTQ:  # again here: the preflight saw fused tensors (split_fused) only whole
            self.check_mygptq(str(self.model_dir), module, weight.group_size, *weight.codes.shape)
        return module_tensors(weight, module, self.target)

    def check_mygptq(self, where: str, module: str, group_size: int, in_features: int, out_features: int) -> None:
        """--format mygptq writes the Marlin layout unpadded: refuse a module its kernels cannot serve as stored."""
        problems = marlin_stored_problems(group_size, in_features, out_features)
        if problems:
            raise FormatError(f"{where}: {module}: --format mygptq writes the Marlin layout, which cannot "
                              f"serve {'; '.join(problems)}; use --format gptq-v2 (--quantization mygptq converts "
                              f"and pads it at load)")


class Timer:
    """Seconds per stage (CUDA work is synchronized at stage boundaries so it lands in its stage)."""

    def __init__(self, device: torch.device):
        self.seconds: dict[str, float] = defaultdict(float)
        self.cuda = device.type == "cuda"

    @contextmanager
    def __call__(self, stage: str):
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            self.seconds[stage] += time.perf_counter() - start


def _forward(layer: nn.Module, x: torch.Tensor, call: dict) -> torch.Tensor:
    out = layer(x, *call["args"], **call["kwargs"])
    return out[0] if isinstance(out, tuple) else out


def input_groups(layer: nn.Module, x: torch.Tensor, call: dict) -> list[list[str]]:
    """Names of the layer's nn.Linear modules grouped by the tensor they read, in execution order.

    Fused MoE experts count as two modules: `<experts>.gate_up_proj` reads the experts' input, and
    `<experts>.down_proj` reads a tensor of its own, computed inside the experts call.
    """
    seen: list[tuple[object, list[str]]] = []  # the tensors stay referenced: no address reuse

    def add(t, name):
        for known, names in seen:
            if known is t:
                names.append(name)
                return
        seen.append((t, [name]))

    def linear(name):
        return lambda _module, args: add(args[0], name)

    def experts(name):
        def pre(_module, args, kwargs):
            add(moe.hidden_states(args, kwargs), f"{name}.gate_up_proj")
            add(object(), f"{name}.down_proj")
        return pre

    handles = [m.register_forward_pre_hook(linear(n)) for n, m in layer.named_modules()
               if isinstance(m, nn.Linear) and not ROUTER.search(n)]
    handles += [m.register_forward_pre_hook(experts(n), with_kwargs=True) for n, m in moe.fused_experts(layer).items()]
    try:
        with torch.no_grad():
            _forward(layer, x, call)
    finally:
        for h in handles:
            h.remove()
    return [names for _, names in seen]


def _rtn_solution(W: torch.Tensor, spec: QuantSpec) -> Solution:
    """Rows rounded to nearest, as a Solution (for rows with no Hessian: an expert that saw no token)."""
    qw = rtn_quantize(W, spec.bits, spec.group_size, spec.sym, min_zero=spec.min_zero, mse=spec.mse)
    return Solution(qw.codes.t().contiguous(), qw.scales.to(torch.float32), qw.zeros, qw.g_idx,
                    torch.zeros(W.shape[0], device=W.device), None, spec)


def _solve_parts(prefix: str, parts: list[tuple[str, torch.Tensor]], H: torch.Tensor | None, job: Job,
                 rules: list[Rule], cross: torch.Tensor | None = None,
                 baseline: list | None = None) -> dict[str, Solution]:
    """Solve weights that read one input (name, weight rows): stacked per spec, each overwritten by its
    Q in place; H None rounds to nearest.

    QEP: cross (δX̂ᵀ) shifts each module's target by its job.qep α; baseline, when a list, gets
    (weight, Q solved without the shift) of every module the shift moved, for the report's comparison.
    """
    by_spec: dict[QuantSpec, list[tuple[str, torch.Tensor]]] = defaultdict(list)
    for n, w in parts:
        spec = job.module_spec(f"{prefix}.{n}", rules)
        if spec is not None:
            by_spec[spec].append((n, w))
    out = {}
    for spec, group in by_spec.items():
        W = torch.cat([w for _, w in group]).to(torch.float32)
        shift = plain = None
        if cross is not None and H is not None:
            alpha = torch.cat([torch.full((w.shape[0],), job.qep.alpha_for(f"{prefix}.{n}")) for n, w in group])
            shift = target_shift(W, cross, alpha)
        if H is None:
            sol = _rtn_solution(W, spec)
        elif shift is not None and baseline is not None:  # rows are independent: one factorisation for both
            R = W.shape[0]
            both = gptq_solve(torch.cat([W, W]), H, spec, shift=torch.cat([shift, torch.zeros_like(shift)]))
            sol, plain = both.rows(0, R), both.rows(R, 2 * R)
        else:
            sol = gptq_solve(W, H, spec, shift=shift)
        start = 0
        for n, w in group:
            part = sol.rows(start, start + w.shape[0])
            if plain is not None:
                baseline.append((w, plain.rows(start, start + w.shape[0]).dequantize().to(w.dtype)))
            start += w.shape[0]
            w.copy_(part.dequantize().to(w.dtype))
            out[n] = part
    return out


def _solve_group(layer: nn.Module, prefix: str, names: list[str], H: torch.Tensor, job: Job,
                 rules: list[Rule], **qep) -> dict[str, Solution]:
    """Solve the nn.Linear modules reading one input: rows stacked per spec, weights replaced by their Q.
    qep: _solve_parts' QEP arguments, passed only when QEP is on."""
    return _solve_parts(prefix, [(n, layer.get_submodule(n).weight) for n in names], H, job, rules, **qep)


@contextmanager
def _weights(layer: nn.Module, params: dict[str, torch.Tensor]):
    """The layer computes with params (by parameter name) inside, with its own weights again after."""
    saved = {n: p.data for n, p in layer.named_parameters()}
    try:
        for n, p in layer.named_parameters():
            p.data = params[n]
        yield
    finally:
        for n, p in layer.named_parameters():
            p.data = saved[n]


def _swap(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Exchange the contents of each (weight, other) pair in place; twice restores them."""
    for w, other in pairs:
        kept = w.clone()
        w.copy_(other)
        other.copy_(kept)


def _sq(t: torch.Tensor) -> float:
    return float(t.float().pow(2).sum())


def _module_record(sol: Solution, tokens: int, fallback: str | None = None) -> dict:
    """fallback: "rtn" whenever the rows were rounded to nearest, else the expert rule applied ("shrink")."""
    s = sol.spec
    return {"loss": float(sol.loss.sum()) if tokens else None, "damp": sol.damp,
            "fallback": "rtn" if sol.damp is None else fallback, "tokens": tokens, "bits": s.bits,
            "group_size": s.group_size, "sym": s.sym, "act_order": s.act_order}


def quantize_layer(layer: nn.Module, prefix: str, X: list[torch.Tensor], calls: dict[int, dict], job: Job,
                   rules: list[Rule], timer: Timer, expert_names: dict[str, ExpertNames] | None = None,
                   Xf: list[torch.Tensor] | None = None) -> tuple[dict[str, Solution], dict]:
    """GPTQ of one decoder layer in place; X (the layer inputs per batch) becomes its quantized outputs.

    expert_names: checkpoint names of the layer's fused experts modules, by name within the layer
    (default: per expert under the module, gate_proj/up_proj/down_proj).
    Xf (with job.qep, and only then): the layer's inputs in the full-precision model; it becomes the
    full-precision outputs.  The record then has fp_error, the relative output error against them,
    and with job.qep.compare fp_error_without_qep, the same for the layer solved without the correction.
    """
    if (job.qep is None) != (Xf is None):
        raise ValueError("QEP needs the full-precision stream Xf, and only QEP takes it")
    qep = job.qep
    call = lambda x: calls[x.shape[0]]  # noqa: E731
    experts = moe.fused_experts(layer)
    names_of = {n: (expert_names or {}).get(n) or ExpertNames(f"{prefix}.{n}", f"{prefix}.{n}", LEAVES, True)
                for n in experts}
    groups = input_groups(layer, X[0], call(X[0]))
    solutions: dict[str, Solution] = {}
    record: dict = {"modules": {}}
    found = {n for names in groups for n in names}
    left = [n for n, p in layer.named_parameters() if p.dim() >= 2 and n not in found
            and n.rpartition(".")[0] not in found and not ROUTER.search(n.rpartition(".")[0])]
    if left:  # e.g. experts in a layout moe.fused_experts does not take (biases, interleaved, transposed)
        log.warning("%s: not nn.Linear, kept in float: %s", prefix, ", ".join(left))
        record["float"] = left
    routed_tokens: dict[str, list[int]] = {}  # experts module -> tokens per expert (same routing for both stages)
    # Y: outputs of the float layer on X (the reference of rel_error).  With QEP the reference is the
    # full-precision model's outputs instead, which replace Xf batch by batch in the last group's pass (the
    # only full one): Xf is read by every group's full-precision pass, and inputs and outputs never coexist.
    Y: list[torch.Tensor] = []
    last = len(groups) - 1
    floats = {n: p.detach().clone() for n, p in layer.named_parameters()} if qep else None
    baseline = [] if qep and qep.compare else None  # (weight, Q without the correction)
    for k, names in enumerate(groups):
        stage = {n: n.rpartition(".") for n in names if n.rpartition(".")[0] in experts}  # (owner, ".", stage)
        captures = {n: moe.RoutedHessians(experts[o], st, moe.starved(routed_tokens[o], experts[o].down_proj.shape[2])
                                          if st == "down_proj" else set(),
                                          floats[f"{o}.gate_up_proj"] if qep else None)
                    for n, (o, _, st) in stage.items()}
        first = names[0]
        acc = None  # the all-token H of the group's input; a down_proj group's input is per expert
        if first not in stage:
            acc = Hessian(layer.get_submodule(first).in_features, X[0].device, cross=qep is not None)
        elif stage[first][2] == "gate_up_proj":
            acc = Hessian(experts[stage[first][0]].gate_up_proj.shape[2], X[0].device, cross=qep is not None)
        seen: set[str] = set()
        fp_in: dict[str, torch.Tensor] = {}  # QEP: the group's input in the full-precision pass of this batch
        mode = {"fp": False}

        def hook(name, shared, acc=acc, captures=captures, members=frozenset(names), seen=seen, fp_in=fp_in,
                 mode=mode, stop_q=k > 0 or qep is not None, stop_fp=k < last):
            def pre(_module, args, kwargs):
                if mode["fp"]:
                    fp_in[name] = moe.hidden_states(args, kwargs)
                else:
                    if shared:
                        acc.add(moe.hidden_states(args, kwargs), fp=fp_in.get(name))
                    if name in captures:
                        captures[name].add(args, kwargs, fp=fp_in.get(name))
                seen.add(name)
                if (stop_fp if mode["fp"] else stop_q) and seen >= members:
                    raise StopForward  # every reader of this input has seen it: the rest is not needed
            return pre

        handles = [(experts[stage[n][0]] if n in stage else layer.get_submodule(n)).register_forward_pre_hook(
            hook(n, acc is not None and n == first), with_kwargs=True) for n in names]
        with timer("hessians"), torch.no_grad():
            for b, x in enumerate(X):
                if qep:
                    seen.clear()
                    mode["fp"] = True
                    try:
                        with _weights(layer, floats):
                            out = _forward(layer, Xf[b], call(Xf[b]))
                        Xf[b] = out  # the last group only: its pass runs through
                    except StopForward:
                        pass
                    mode["fp"] = False
                seen.clear()
                try:
                    y = _forward(layer, x, call(x))
                    Y.append(y)  # only the first (full) pass gets here: the float outputs
                except StopForward:
                    pass
                fp_in.clear()
        for h in handles:
            h.remove()
        with timer("solve"), torch.no_grad():
            H = acc.finalize() if acc is not None else None
            extra = {"cross": acc.finalize_cross() if acc is not None else None, "baseline": baseline} if qep else {}
            linear = [n for n in names if n not in stage]
            solved = _solve_group(layer, prefix, linear, H, job, rules, **extra) if linear else {}
            for n, sol in solved.items():
                record["modules"][n] = _module_record(sol, acc.tokens)
            for n, cap in captures.items():
                owner, _, st = stage[n]
                solved.update(_solve_experts(experts[owner], names_of[owner], owner, st, cap, H, routed_tokens,
                                             prefix, job, rules, record, baseline))
            del acc, captures, extra
        solutions.update(solved)
    err = ref = base = 0.0
    with timer("replay"), torch.no_grad():
        for b, x in enumerate(X):
            y = _forward(layer, x, call(x))
            want = Xf[b] if qep else Y[b]
            err += _sq(y.float() - want.float())
            ref += _sq(want)
            if baseline is not None:
                _swap(baseline)
                base += _sq(_forward(layer, x, call(x)).float() - want.float())
                _swap(baseline)
            X[b] = y
    record["fp_error" if qep else "rel_error"] = (err / ref) ** 0.5 if ref else 0.0
    if baseline is not None:
        record["fp_error_without_qep"] = (base / ref) ** 0.5 if ref else 0.0
    return solutions, record


def _solve_experts(module: nn.Module, names: ExpertNames, owner: str, stage: str, cap: "moe.RoutedHessians",
                   H_all: torch.Tensor | None, routed_tokens: dict[str, list[int]], prefix: str, job: Job,
                   rules: list[Rule], record: dict, baseline: list | None = None) -> dict[str, Solution]:
    """Every expert's rows of one stage, each against its routed (or shrunk) H; the report gets the
    token counts and the experts that took a fallback.  With QEP each expert is solved on its routed
    cross term (baseline: as in _solve_parts)."""
    tokens = cap.tokens
    if stage == "gate_up_proj":
        routed_tokens[owner] = tokens
        log.info("%s.%s: calibration tokens per expert %s", prefix, owner, tokens)
    elif tokens != routed_tokens[owner]:  # the router reads the block input, which no expert weight changes
        raise RuntimeError(f"{prefix}.{owner}: routing changed between the gate/up and down passes")
    summary = record.setdefault("experts", {}).setdefault(owner, {"tokens": tokens, "rtn": [], "shrink": {}})
    out = {}
    for e in moe.expert_solves(module, names, prefix, stage, cap, H_all):
        extra = {"cross": e.cross, "baseline": baseline} if job.qep else {}
        solved = _solve_parts(prefix, e.parts, e.H, job, rules, **extra)
        for n, sol in solved.items():
            record["modules"][n] = _module_record(sol, e.tokens, e.fallback)
        if e.fallback == "rtn" and e.expert not in summary["rtn"]:
            summary["rtn"].append(e.expert)
        elif e.fallback == "shrink":
            summary["shrink"].setdefault(stage, []).append(e.expert)
        out.update(solved)
    return out


def _layer_tensors(names: list[str], solutions: dict[str, Solution], prefix: str, job: Job, ckpt,
                   model_type: str) -> dict:
    """Everything the checkpoint holds under one prefix: packed modules, the rest copied (fused experts
    of the source split per expert, the names everything is written under)."""
    out = {}
    quantized = {f"{prefix}.{n}.weight": f"{prefix}.{n}" for n in solutions}
    for name, module in quantized.items():
        out.update(job.tensors(solutions[module[len(prefix) + 1:]].weight(), module))
    rest = split_fused(ckpt.read([n for n in names if n not in quantized]), model_type)
    out.update({n: t for n, t in rest.items() if n not in quantized})
    return out


def _config(job: Job, rules: list[Rule], meta: dict) -> dict:
    s = job.spec
    if job.target is Target.COMPRESSED_TENSORS:
        if any(not r.skip for r in rules):
            raise ValueError("per-module bit overrides cannot be written as compressed-tensors here; "
                             "use --format gptq-v1/gptq-v2/mygptq, or only skip rules")
        ignore = ([] if job.lm_head else ["lm_head"]) + [f"re:{r.pattern.pattern}" for r in rules if r.skip]
        return quantization_config(job.target, s.bits, s.group_size, s.sym, s.act_order == "desc", ignore=ignore,
                                   observer="mse" if s.mse else "minmax")
    return quantization_config(job.target, s.bits, s.group_size, s.sym, s.act_order == "desc",
                               dynamic=job.dynamic, lm_head=job.lm_head, meta=meta)


def _preflight_mygptq(job: Job, rules: list[Rule], ckpt) -> None:
    """Every module --format mygptq would write, checked before any work (Job.check_mygptq)."""
    for name, shape in ckpt.shapes().items():
        module = quantizable_module(name, shape) or ("lm_head" if name == "lm_head.weight" and job.lm_head else None)
        spec = job.module_spec(module, rules) if module and not ROUTER.search(module) else None
        if spec is not None:
            job.check_mygptq(str(ckpt.where[name]), module, spec.group_size, shape[1], shape[0])


def quantize(job: Job, calibration: Calibration | None) -> dict:
    """Quantize job.model_dir into job.out_dir; returns the report (also written as quantize_report.json)."""
    rules = Rule.parse(job.dynamic)
    timer = Timer(job.device)
    if job.qep is not None and job.method != "gptq":
        raise ValueError("QEP corrects GPTQ's targets: it needs --method gptq")
    report: dict = {"method": job.method, "spec": {k: str(v) for k, v in asdict(job.spec).items()}, "layers": []}
    if job.qep is not None:
        report["qep"] = _qep_meta(job.qep)
    with timer("load"):
        shell = ModelShell(job.model_dir, job.device, job.dtype)
    ckpt = shell.ckpt
    tied = bool(getattr(shell.config.get_text_config(), "tie_word_embeddings", False))
    if job.lm_head and tied:
        raise ValueError("--lm-head: this model ties lm_head to the input embeddings; quantizing it would "
                         "quantize the embeddings too")
    by_layer: dict[int, list[str]] = defaultdict(list)
    outer: list[str] = []
    for name in ckpt.names():
        m = re.match(rf"^{re.escape(shell.layers_name)}\.(\d+)\.", name)
        (by_layer[int(m.group(1))] if m else outer).append(name)

    meta = {"method": job.method, "act_order": job.spec.act_order, "damp": job.spec.damp, "mse": job.spec.mse,
            "true_sequential": True}
    if calibration is not None:
        meta["calibration"] = calibration.meta
    if job.qep is not None:
        meta["qep"] = _qep_meta(job.qep)
    qconfig = _config(job, rules, meta)  # refuses impossible settings before any work
    if job.target is Target.MYGPTQ:
        _preflight_mygptq(job, rules, ckpt)
    with CheckpointWriter(job.out_dir, overwrite=job.overwrite) as writer:
        head = [n for n in outer if n == "lm_head.weight"] if job.lm_head else []
        writer.add_all(ckpt.read([n for n in outer if n not in head]))
        if job.method == "rtn":
            _rtn(job, rules, ckpt, by_layer, head, writer, timer, report)
        else:
            _gptq(job, rules, shell, calibration, by_layer, head, writer, timer, report)
        config = shell.config.to_dict()
        config["quantization_config"] = qconfig
        writer.write_json("config.json", config)
        if job.target in (Target.GPTQ_V1, Target.GPTQ_V2):
            writer.write_json("quantize_config.json", config["quantization_config"])
        for f in NON_WEIGHT_FILES:
            if f != "config.json" and (job.model_dir / f).exists():
                writer.copy_file(job.model_dir / f)
        report["seconds"] = dict(timer.seconds)
        writer.write_json("quantize_report.json", report)
        with timer("write"):
            writer.finish()
    report["seconds"] = dict(timer.seconds)
    return report


def _qep_meta(qep: QEP) -> dict:
    return {"alpha": [list(rule) for rule in qep.alpha], "compare": qep.compare}


def _rtn(job, rules, ckpt, by_layer, head, writer, timer, report) -> None:
    model_type = json.loads((job.model_dir / "config.json").read_text()).get("model_type", "")
    for i in tqdm(sorted(by_layer), desc="rtn", unit="layer", disable=not job.progress):
        tensors = {}
        with timer("solve"):
            for name, t in split_fused(ckpt.read(by_layer[i], job.device), model_type).items():
                module = quantizable_module(name, tuple(t.shape))
                spec = job.module_spec(module, rules) if module and not ROUTER.search(module) else None
                if spec is None:
                    tensors[name] = t
                    continue
                qw = rtn_quantize(t, spec.bits, spec.group_size, spec.sym, min_zero=spec.min_zero, mse=spec.mse)
                tensors.update(job.tensors(qw, module))
        with timer("write"):
            writer.add_all(tensors)
    spec = job.module_spec("lm_head", rules)
    for name in head:
        t = ckpt.read([name], job.device)[name]
        if spec is None:
            writer.add(name, t)
        else:
            qw = rtn_quantize(t, spec.bits, spec.group_size, spec.sym, min_zero=spec.min_zero, mse=spec.mse)
            writer.add_all(job.tensors(qw, "lm_head"))


def _gptq(job, rules, shell, calibration, by_layer, head, writer, timer, report) -> None:
    if calibration is None:
        raise ValueError("GPTQ needs calibration data")
    rows = calibration.rows
    batches = [rows[i:i + job.batch_size] for i in range(0, rows.shape[0], job.batch_size)]
    with timer("capture"):
        X, calls = shell.capture(batches)
    Xf = list(X) if job.qep else None  # the full-precision stream starts at the same embeddings
    for i in tqdm(range(len(shell.layers)), desc="gptq+qep" if job.qep else "gptq", unit="layer",
                  disable=not job.progress):
        prefix = shell.layer_prefix(i)
        with timer("load"):
            layer = shell.load_layer(i)
        per_size = {size: layers[i] for size, layers in calls.items()}
        names = {n[len(prefix) + 1:]: v for n, v in shell.experts.items() if n.startswith(prefix + ".")}
        solutions, record = quantize_layer(layer, prefix, X, per_size, job, rules, timer, names, Xf)
        record["layer"] = i
        report["layers"].append(record)
        if job.qep is None:
            log.info("layer %d: relative output error %.4g", i, record["rel_error"])
        else:
            log.info("layer %d: relative output error against the full-precision model %.4g%s", i,
                     record["fp_error"], f" (without QEP {record['fp_error_without_qep']:.4g})"
                     if "fp_error_without_qep" in record else "")
        with timer("write"):
            writer.add_all(_layer_tensors(by_layer[i], solutions, prefix, job, shell.ckpt, shell.config.model_type))
        shell.unload_layer(i)
    spec = job.module_spec("lm_head", rules)
    if head and spec is None:
        writer.add_all(shell.ckpt.read(head))
    elif head:
        with timer("hessians"):
            acc = Hessian(shell.config.get_text_config().hidden_size, job.device, cross=job.qep is not None)
            fp = shell.final_hidden(Xf) if job.qep else None
            for b, h in enumerate(shell.final_hidden(X)):
                acc.add(h, fp=fp[b] if fp else None)
        with timer("solve"):
            W = shell.ckpt.read(head, job.device)[head[0]].to(torch.float32)
            shift = None
            if job.qep:
                shift = target_shift(W, acc.finalize_cross(), torch.full((W.shape[0],), job.qep.alpha_for("lm_head")))
            sol = gptq_solve(W, acc.finalize(), spec, shift=shift)
        report["lm_head"] = _module_record(sol, acc.tokens)
        writer.add_all(job.tensors(sol.weight(), "lm_head"))
