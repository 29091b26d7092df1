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
"""

from __future__ import annotations

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
from .calibration import Calibration
from .capture import ModelShell, StopForward
from .hessian import Hessian
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
    """Names of the layer's nn.Linear modules grouped by the tensor they read, in execution order."""
    seen: list[tuple[torch.Tensor, list[str]]] = []  # the tensors stay referenced: no address reuse

    def hook(name):
        def pre(_module, args):
            for t, names in seen:
                if t is args[0]:
                    names.append(name)
                    return
            seen.append((args[0], [name]))
        return pre

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layer.named_modules()
               if isinstance(m, nn.Linear) and not ROUTER.search(n)]
    try:
        with torch.no_grad():
            _forward(layer, x, call)
    finally:
        for h in handles:
            h.remove()
    return [names for _, names in seen]


def _solve_group(layer: nn.Module, prefix: str, names: list[str], H: torch.Tensor, job: Job,
                 rules: list[Rule]) -> dict[str, Solution]:
    """Solve the modules reading one input: rows stacked per spec, weights replaced by their Q."""
    by_spec: dict[QuantSpec, list[str]] = defaultdict(list)
    for n in names:
        spec = job.module_spec(f"{prefix}.{n}", rules)
        if spec is not None:
            by_spec[spec].append(n)
    out = {}
    for spec, group in by_spec.items():
        mods = [layer.get_submodule(n) for n in group]
        sol = gptq_solve(torch.cat([m.weight for m in mods]).to(torch.float32), H, spec)
        start = 0
        for n, m in zip(group, mods):
            part = sol.rows(start, start + m.out_features)
            start += m.out_features
            m.weight.copy_(part.dequantize().to(m.weight.dtype))
            out[n] = part
    return out


def _module_record(sol: Solution, tokens: int) -> dict:
    s = sol.spec
    return {"loss": float(sol.loss.sum()), "damp": sol.damp, "fallback": None if sol.damp is not None else "rtn",
            "tokens": tokens, "bits": s.bits, "group_size": s.group_size, "sym": s.sym, "act_order": s.act_order}


def quantize_layer(layer: nn.Module, prefix: str, X: list[torch.Tensor], calls: dict[int, dict], job: Job,
                   rules: list[Rule], timer: Timer) -> tuple[dict[str, Solution], dict]:
    """GPTQ of one decoder layer in place; X (the layer inputs per batch) becomes its quantized outputs."""
    call = lambda x: calls[x.shape[0]]  # noqa: E731
    groups = input_groups(layer, X[0], call(X[0]))
    solutions: dict[str, Solution] = {}
    record: dict = {"modules": {}}
    found = {n for names in groups for n in names}
    left = [n for n, p in layer.named_parameters() if p.dim() >= 2 and n.rpartition(".")[0] not in found
            and not ROUTER.search(n.rpartition(".")[0])]
    if left:  # e.g. fused MoE experts (3-D parameters), which this quantizer does not handle
        log.warning("%s: not nn.Linear, kept in float: %s", prefix, ", ".join(left))
        record["float"] = left
    Y: list[torch.Tensor] = []
    for k, names in enumerate(groups):
        first = layer.get_submodule(names[0])
        acc = Hessian(first.in_features, X[0].device)

        def pre(_module, args, acc=acc, stop=k > 0):
            acc.add(args[0])
            if stop:
                raise StopForward

        handle = first.register_forward_pre_hook(pre)
        with timer("hessians"), torch.no_grad():
            for x in X:
                try:
                    y = _forward(layer, x, call(x))
                    Y.append(y)  # only the first (full) pass gets here: the float outputs
                except StopForward:
                    pass
        handle.remove()
        with timer("solve"), torch.no_grad():
            tokens = acc.tokens
            solved = _solve_group(layer, prefix, names, acc.finalize(), job, rules)
            del acc
        for n, sol in solved.items():
            record["modules"][n] = _module_record(sol, tokens)
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


def _layer_tensors(names: list[str], solutions: dict[str, Solution], prefix: str, job: Job, ckpt) -> dict:
    """Everything the checkpoint holds under one prefix: packed modules, the rest copied."""
    out = {}
    quantized = {f"{prefix}.{n}.weight": f"{prefix}.{n}" for n in solutions}
    rest = [n for n in names if n not in quantized]
    for name, module in quantized.items():
        out.update(module_tensors(solutions[module[len(prefix) + 1:]].weight(), module, job.target))
    out.update(ckpt.read(rest))
    return out


def _config(job: Job, rules: list[Rule], meta: dict) -> dict:
    s = job.spec
    if job.target is Target.COMPRESSED_TENSORS:
        if any(not r.skip for r in rules):
            raise ValueError("per-module bit overrides cannot be written as compressed-tensors here; "
                             "use --format gptq-v1/gptq-v2/mygptq, or only skip rules")
        ignore = ([] if job.lm_head else ["lm_head"]) + [f"re:{r.pattern.pattern}" for r in rules if r.skip]
        return quantization_config(job.target, s.bits, s.group_size, s.sym, s.act_order == "desc", ignore=ignore)
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

    meta = {"method": job.method, "act_order": job.spec.act_order, "damp": job.spec.damp,
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
    for i in tqdm(sorted(by_layer), desc="rtn", unit="layer", disable=not job.progress):
        tensors = {}
        with timer("solve"):
            for name, t in ckpt.read(by_layer[i], job.device).items():
                module = quantizable_module(name, tuple(t.shape))
                spec = job.module_spec(module, rules) if module and not ROUTER.search(module) else None
                if spec is None:
                    tensors[name] = t
                    continue
                qw = rtn_quantize(t, spec.bits, spec.group_size, spec.sym, min_zero=spec.min_zero)
                tensors.update(module_tensors(qw, module, job.target))
        with timer("write"):
            writer.add_all(tensors)
    spec = job.module_spec("lm_head", rules)
    for name in head:
        t = ckpt.read([name], job.device)[name]
        if spec is None:
            writer.add(name, t)
        else:
            qw = rtn_quantize(t, spec.bits, spec.group_size, spec.sym, min_zero=spec.min_zero)
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
        solutions, record = quantize_layer(layer, prefix, X, per_size, job, rules, timer)
        record["layer"] = i
        report["layers"].append(record)
        log.info("layer %d: relative output error %.4g", i, record["rel_error"])
        with timer("write"):
            writer.add_all(_layer_tensors(by_layer[i], solutions, prefix, job, shell.ckpt))
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
