"""`gptq-convert inspect SRC`: what a checkpoint is, and what is wrong with it.

Every quantized module is decoded and validated like `convert` would; a problem is recorded with the
file, tensor and expectation, and the inspection goes on, so one run lists every broken module.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

import torch
from tqdm import tqdm

from gptq_vllm.formats.act_order import act_order_perm, is_trivial
from gptq_vllm.formats.errors import FormatError
from gptq_vllm.formats.kernel_layout import Layout

from ..quantize.targets import layer_index
from .convert import absorptions, by_parent, preflight
from .emit import Target
from .hub import Source
from .readers import Checkpoint


@dataclass
class InspectReport:
    source: dict
    format: dict
    bits: int
    group_size: int
    sym: bool
    desc_act: bool  # as the config says
    dynamic: dict
    lm_head: bool
    layers: int = 0
    modules: int = 0
    module_params: dict = field(default_factory=dict)  # "bits/group_size/sym" -> modules
    act_order_modules: int = 0
    absorbable: int = 0  # down projections whose permutation `convert` folds into gate/up
    files: int = 0
    tensors: int = 0
    size_bytes: int = 0
    layouts: dict = field(default_factory=dict)  # target layout -> "ok" or why not
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def inspect(source: Source, ckpt: Checkpoint, progress: bool = True) -> InspectReport:
    c = ckpt.config
    names = ckpt.tensors.names()
    report = InspectReport(
        source=source.describe(), format={}, bits=c.base.bits, group_size=c.base.group_size, sym=c.base.sym,
        desc_act=c.base.desc_act, dynamic=c.dynamic, lm_head=any(m.rpartition(".")[2] == "lm_head" for m in ckpt.modules()),
        modules=len(ckpt.modules()), files=len(ckpt.tensors.files), tensors=len(names), size_bytes=ckpt.nbytes(names),
        layers=len({i for m in ckpt.modules() if (i := layer_index(m)) is not None}),
    )
    params: Counter[str] = Counter()
    undeclared = 0  # modules with an act-order g_idx whose config says desc_act=false
    with tqdm(total=report.modules, desc="inspect", unit="module", disable=not progress, leave=False) as bar:
        for modules in by_parent(ckpt.modules()).values():
            perms: dict[str, torch.Tensor | None] = {}
            g_idx: dict[str, torch.Tensor] = {}
            for module in modules:
                bar.update()
                try:
                    w = ckpt.load(module)
                except FormatError as e:
                    report.problems.append(str(e))
                    continue
                params[f"bits={w.bits} group_size={w.group_size} sym={w.sym}"] += 1
                perms[module] = None if is_trivial(w.g_idx, w.group_size) else act_order_perm(w.g_idx)
                g_idx[module] = w.g_idx
                report.act_order_modules += perms[module] is not None
                undeclared += perms[module] is not None and not ckpt.params(module).desc_act
            report.absorbable += sum(perms.get(m) is not None for m in absorptions(modules))
            try:
                ckpt.check_fused(g_idx)
            except FormatError as e:
                report.problems.append(str(e))
    report.module_params = dict(params)
    report.format = ckpt.describe()
    if undeclared and c.method != "mygptq":
        # Not a problem: g_idx decides act-order for every gptq-convert command and mygptq (validate.py).
        report.notes.append(f"config says desc_act=false but {undeclared} modules have an act-order "
                            f"g_idx: it is honoured (convert writes desc_act=true); vLLM's own gptq method "
                            f"would ignore it")
    if c.base.desc_act and not report.act_order_modules and report.modules:
        report.notes.append("config says desc_act=true but every g_idx is trivial (static groups): "
                            "act-order costs nothing here and convert drops it")
    if c.lm_head != report.lm_head and c.method == "gptq":
        report.problems.append(f"config says lm_head={c.lm_head} but lm_head is {'' if report.lm_head else 'not '}quantized")
    for layout in Layout:
        try:
            preflight(ckpt, Target.MYGPTQ, layout)
            report.layouts[layout.value] = "ok"
        except FormatError as e:
            report.layouts[layout.value] = str(e)
    return report


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    raise AssertionError


def render(r: InspectReport) -> str:
    """The report as aligned text lines."""
    src = r.source.get("source", "")
    if "commit" in r.source:
        src += f" (revision {r.source['revision']}, commit {r.source['commit']})"
    f = r.format
    # The dialect names the writer's flavour (gptq: autogptq / gptqmodel / ...); a converted checkpoint has one.
    dialect = f"{f['dialect']}; " if f["dialect"] != f["quant_method"] else ""
    fmt = f"{f['quant_method']} ({dialect}config from {', '.join(f['config_files'])})"
    lines = [("source", src), ("format", fmt)]
    if "checkpoint_format" in f:
        seen = ", ".join(f"{n} modules look {k}" for k, n in sorted(f["zero_format_in_data"].items())) or "-"
        override = " (overridden)" if f["checkpoint_format_overridden"] else ""
        lines.append(("zero points", f"{f['checkpoint_format']}{override}; data: {seen}"))
    if "layout" in f:
        lines.append(("layout", f["layout"]))
    lines += [
        ("quantizer", ", ".join(f["quantizer"]) or "-"),
        ("config", f"bits={r.bits} group_size={r.group_size} sym={r.sym} desc_act={r.desc_act}"),
        ("dynamic", ", ".join(f"{k}: {v}" for k, v in r.dynamic.items()) or "-"),
        ("modules", f"{r.modules} quantized in {r.layers} layers; lm_head {'quantized' if r.lm_head else 'not quantized'}"),
        *(("", f"{n} x {k}") for k, n in sorted(r.module_params.items())),
        ("act-order", f"{r.act_order_modules} modules with a permutation ({r.absorbable} absorbable into gate/up)"),
        ("size", f"{_size(r.size_bytes)} in {r.files} file(s), {r.tensors} tensors"),
        *((f"{layout} layout", why) for layout, why in r.layouts.items()),
        *(("note", n) for n in r.notes),
        ("problems", str(len(r.problems)) if r.problems else "none"),
        *(("", p) for p in r.problems),
    ]
    width = max(len(k) for k, _ in lines)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in lines)
