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

from ..checkpoint.emit import Target, module_tensors, quantization_config
from ..checkpoint.safetensors_dir import NON_WEIGHT_FILES
from ..checkpoint.writer import CheckpointWriter
from . import moe
from .calibration import Calibration
from .capture import ModelShell, StopForward
from .hessian import Hessian
from .moe_names import LEAVES, ExpertNames, split_fused
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

    def module_spec(self, module: str, rules: list[Rule]) -> QuantSpec | None:
        spec = spec_for(module, self.spec, rules)
        if spec is not None and self.target is Target.GPTQ_V1 and not spec.sym:
            spec = replace(spec, min_zero=1)  # v1 stores z-1: a zero of 0 cannot be written
        return spec


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
                 rules: list[Rule]) -> dict[str, Solution]:
    """Solve weights that read one input (name, weight rows): stacked per spec, each overwritten by its
    Q in place; H None rounds to nearest."""
    by_spec: dict[QuantSpec, list[tuple[str, torch.Tensor]]] = defaultdict(list)
    for n, w in parts:
        spec = job.module_spec(f"{prefix}.{n}", rules)
        if spec is not None:
            by_spec[spec].append((n, w))
    out = {}
    for spec, group in by_spec.items():
        W = torch.cat([w for _, w in group]).to(torch.float32)
        sol = gptq_solve(W, H, spec) if H is not None else _rtn_solution(W, spec)
        start = 0
        for n, w in group:
            part = sol.rows(start, start + w.shape[0])
            start += w.shape[0]
            w.copy_(part.dequantize().to(w.dtype))
            out[n] = part
    return out


def _solve_group(layer: nn.Module, prefix: str, names: list[str], H: torch.Tensor, job: Job,
                 rules: list[Rule]) -> dict[str, Solution]:
    """Solve the nn.Linear modules reading one input: rows stacked per spec, weights replaced by their Q."""
    return _solve_parts(prefix, [(n, layer.get_submodule(n).weight) for n in names], H, job, rules)


def _module_record(sol: Solution, tokens: int, fallback: str | None = None) -> dict:
    """fallback: "rtn" whenever the rows were rounded to nearest, else the expert rule applied ("shrink")."""
    s = sol.spec
    return {"loss": float(sol.loss.sum()) if tokens else None, "damp": sol.damp,
            "fallback": "rtn" if sol.damp is None else fallback, "tokens": tokens, "bits": s.bits,
            "group_size": s.group_size, "sym": s.sym, "act_order": s.act_order}


def quantize_layer(layer: nn.Module, prefix: str, X: list[torch.Tensor], calls: dict[int, dict], job: Job,
                   rules: list[Rule], timer: Timer,
                   expert_names: dict[str, ExpertNames] | None = None) -> tuple[dict[str, Solution], dict]:
    """GPTQ of one decoder layer in place; X (the layer inputs per batch) becomes its quantized outputs.

    expert_names: checkpoint names of the layer's fused experts modules, by name within the layer
    (default: per expert under the module, gate_proj/up_proj/down_proj).
    """
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
    Y: list[torch.Tensor] = []
    for k, names in enumerate(groups):
        stage = {n: n.rpartition(".") for n in names if n.rpartition(".")[0] in experts}  # (owner, ".", stage)
        captures = {n: moe.RoutedHessians(experts[o], st, moe.starved(routed_tokens[o], experts[o].down_proj.shape[2])
                                          if st == "down_proj" else set()) for n, (o, _, st) in stage.items()}
        first = names[0]
        acc = None  # the all-token H of the group's input; a down_proj group's input is per expert
        if first not in stage:
            acc = Hessian(layer.get_submodule(first).in_features, X[0].device)
        elif stage[first][2] == "gate_up_proj":
            acc = Hessian(experts[stage[first][0]].gate_up_proj.shape[2], X[0].device)
        seen: set[str] = set()

        def hook(name, shared, acc=acc, captures=captures, members=frozenset(names), stop=k > 0, seen=seen):
            def pre(_module, args, kwargs):
                if shared:
                    acc.add(moe.hidden_states(args, kwargs))
                if name in captures:
                    captures[name].add(args, kwargs)
                seen.add(name)
                if stop and seen >= members:  # every reader of this input has seen it: the rest is not needed
                    raise StopForward
            return pre

        handles = [(experts[stage[n][0]] if n in stage else layer.get_submodule(n)).register_forward_pre_hook(
            hook(n, acc is not None and n == first), with_kwargs=True) for n in names]
        with timer("hessians"), torch.no_grad():
            for x in X:
                seen.clear()
                try:
                    y = _forward(layer, x, call(x))
                    Y.append(y)  # only the first (full) pass gets here: the float outputs
                except StopForward:
                    pass
        for h in handles:
            h.remove()
        with timer("solve"), torch.no_grad():
            H = acc.finalize() if acc is not None else None
            linear = [n for n in names if n not in stage]
            solved = _solve_group(layer, prefix, linear, H, job, rules) if linear else {}
            for n, sol in solved.items():
                record["modules"][n] = _module_record(sol, acc.tokens)
            for n, cap in captures.items():
                owner, _, st = stage[n]
                solved.update(_solve_experts(experts[owner], names_of[owner], owner, st, cap, H, routed_tokens,
                                             prefix, job, rules, record))
            del acc, captures
        solutions.update(solved)
    err = ref = 0.0
    with timer("replay"), torch.no_grad():
        for b, x in enumerate(X):
            y = _forward(layer, x, call(x))
            err += float((y.float() - Y[b].float()).pow(2).sum())
            ref += float(Y[b].float().pow(2).sum())
            X[b] = y
    record["rel_error"] = (err / ref) ** 0.5 if ref else 0.0
    return solutions, record


def _solve_experts(module: nn.Module, names: ExpertNames, owner: str, stage: str, cap: "moe.RoutedHessians",
                   H_all: torch.Tensor | None, routed_tokens: dict[str, list[int]], prefix: str, job: Job,
                   rules: list[Rule], record: dict) -> dict[str, Solution]:
    """Every expert's rows of one stage, each against its routed (or shrunk) H; the report gets the
    token counts and the experts that took a fallback."""
    tokens = cap.tokens
    if stage == "gate_up_proj":
        routed_tokens[owner] = tokens
        log.info("%s.%s: calibration tokens per expert %s", prefix, owner, tokens)
    elif tokens != routed_tokens[owner]:  # the router reads the block input, which no expert weight changes
        raise RuntimeError(f"{prefix}.{owner}: routing changed between the gate/up and down passes")
    summary = record.setdefault("experts", {}).setdefault(owner, {"tokens": tokens, "rtn": [], "shrink": {}})
    out = {}
    for e in moe.expert_solves(module, names, prefix, stage, cap, H_all):
        solved = _solve_parts(prefix, e.parts, e.H, job, rules)
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
        out.update(module_tensors(solutions[module[len(prefix) + 1:]].weight(), module, job.target))
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


def quantize(job: Job, calibration: Calibration | None) -> dict:
    """Quantize job.model_dir into job.out_dir; returns the report (also written as quantize_report.json)."""
    rules = Rule.parse(job.dynamic)
    timer = Timer(job.device)
    report: dict = {"method": job.method, "spec": {k: str(v) for k, v in asdict(job.spec).items()}, "layers": []}
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
    qconfig = _config(job, rules, meta)  # refuses impossible settings before any work
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
                tensors.update(module_tensors(qw, module, job.target))
        with timer("write"):
            writer.add_all(tensors)
    spec = job.module_spec("lm_head", rules)
    for name in head:
        t = ckpt.read([name], job.device)[name]
        if spec is None:
            writer.add(name, t)
        else:
            qw = rtn_quantize(t, spec.bits, spec.group_size, spec.sym, min_zero=spec.min_zero, mse=spec.mse)
            writer.add_all(module_tensors(qw, "lm_head", job.target))


def _gptq(job, rules, shell, calibration, by_layer, head, writer, timer, report) -> None:
    if calibration is None:
        raise ValueError("GPTQ needs calibration data")
    rows = calibration.rows
    batches = [rows[i:i + job.batch_size] for i in range(0, rows.shape[0], job.batch_size)]
    with timer("capture"):
        X, calls = shell.capture(batches)
    for i in tqdm(range(len(shell.layers)), desc="gptq", unit="layer", disable=not job.progress):
        prefix = shell.layer_prefix(i)
        with timer("load"):
            layer = shell.load_layer(i)
        per_size = {size: layers[i] for size, layers in calls.items()}
        names = {n[len(prefix) + 1:]: v for n, v in shell.experts.items() if n.startswith(prefix + ".")}
        solutions, record = quantize_layer(layer, prefix, X, per_size, job, rules, timer, names)
        record["layer"] = i
        report["layers"].append(record)
        log.info("layer %d: relative output error %.4g", i, record["rel_error"])
        with timer("write"):
            writer.add_all(_layer_tensors(by_layer[i], solutions, prefix, job, shell.ckpt, shell.config.model_type))
        shell.unload_layer(i)
    spec = job.module_spec("lm_head", rules)
    if head and spec is None:
        writer.add_all(shell.ckpt.read(head))
    elif head:
        with timer("hessians"):
            acc = Hessian(shell.config.get_text_config().hidden_size, job.device)
            for h in shell.final_hidden(X):
                acc.add(h)
        with timer("solve"):
            W = shell.ckpt.read(head, job.device)[head[0]].to(torch.float32)
            sol = gptq_solve(W, acc.finalize(), spec)
        report["lm_head"] = _module_record(sol, acc.tokens)
        writer.add_all(module_tensors(sol.weight(), "lm_head", job.target))
