"""`gptq-convert verify SRC DST`: prove that two checkpoints hold the same weights.

Both are read with the readers (any supported format, layouts and stored perms undone by the format
core) and every quantized module is dequantized in both and compared exactly, a block of rows at a time.
Where `convert` absorbed a down projection's act-order permutation into gate/up (DST's down_proj has a
trivial g_idx while SRC's has not), the comparison applies that permutation to SRC: rows of down_proj,
output channels (and bias) of its producers, which is exactly the identity that keeps the MLP unchanged.
Every other tensor must be bit-identical, and neither side may have modules or tensors the other lacks.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from tqdm import tqdm

from gptq_vllm.formats.act_order import act_order_perm, is_trivial
from gptq_vllm.formats.gptq import QuantizedWeight
from gptq_vllm.formats.reference import dequantize

from .convert import absorptions, by_parent
from .readers import Checkpoint

CHUNK_ELEMENTS = 2**24  # dequantized elements compared at once


@dataclass
class VerifyReport:
    modules: int = 0
    tensors: int = 0
    absorbed: int = 0
    mismatches: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches


def _rows(w: QuantizedWeight, rows: torch.Tensor) -> QuantizedWeight:
    return replace(w, codes=w.codes[rows], g_idx=w.g_idx[rows])


def compare_weights(src: QuantizedWeight, dst: QuantizedWeight, row_perm: torch.Tensor | None = None,
                    col_perm: torch.Tensor | None = None) -> str | None:
    """None when dst == src[row_perm][:, col_perm] as dequantized weights, else where they first differ."""
    if src.codes.shape != dst.codes.shape:
        return f"shape (K, N) {tuple(dst.codes.shape)}, expected {tuple(src.codes.shape)}"
    K, N = src.codes.shape
    step = max(1, CHUNK_ELEMENTS // max(N, 1))
    for start in range(0, K, step):
        rows = torch.arange(start, min(K, start + step))
        expected = dequantize(_rows(src, rows if row_perm is None else row_perm[rows].to(torch.int64)))
        if col_perm is not None:
            expected = expected[:, col_perm.to(torch.int64)]
        got = dequantize(_rows(dst, rows))
        if not torch.equal(expected, got):
            k, n = divmod(int((expected != got).to(torch.int8).argmax()), N)
            return (f"weights differ first at input channel {start + k}, output channel {n}: "
                    f"{float(got[k, n])!r}, expected {float(expected[k, n])!r}")
    return None


def verify(src: Checkpoint, dst: Checkpoint, progress: bool = True) -> VerifyReport:
    report = VerifyReport()
    src_modules, dst_modules = set(src.modules()), set(dst.modules())
    for m in sorted(src_modules - dst_modules):
        report.mismatches.append(f"{m}: quantized in {src.path} but not in {dst.path}")
    for m in sorted(dst_modules - src_modules):
        report.mismatches.append(f"{m}: quantized in {dst.path} but not in {src.path}")
    common = [m for m in src.modules() if m in dst_modules]
    out_perms: dict[str, torch.Tensor] = {}
    with tqdm(total=len(common), desc="verify", unit="module", disable=not progress, leave=False) as bar:
        for modules in by_parent(common).values():
            consumers = absorptions(modules)
            g_idx: tuple[dict, dict] = ({}, {})
            for module in [*consumers, *(m for m in modules if m not in consumers)]:
                s, d = src.load(module), dst.load(module)
                g_idx[0][module], g_idx[1][module] = s.g_idx, d.g_idx
                row_perm = None
                if module in consumers and not is_trivial(s.g_idx, s.group_size) and is_trivial(d.g_idx, d.group_size):
                    row_perm = act_order_perm(s.g_idx)
                    out_perms.update({p: row_perm for p in consumers[module]})
                    report.absorbed += 1
                problem = compare_weights(s, d, row_perm, out_perms.get(module))
                if problem:
                    report.mismatches.append(f"{module}: {problem}")
                report.modules += 1
                bar.update()
            src.check_fused(g_idx[0])  # the validation every entry point runs (validate.check_fused)
            dst.check_fused(g_idx[1])
    _compare_tensors(src, dst, out_perms, report)
    return report


def _compare_tensors(src: Checkpoint, dst: Checkpoint, out_perms: dict[str, torch.Tensor], report: VerifyReport) -> None:
    src_names, dst_names = src.passthrough(), set(dst.passthrough())
    for name in src_names:
        if name not in dst_names:
            report.mismatches.append(f"{name}: in {src.path} but not in {dst.path}")
            continue
        a, b = src.tensors.get(name), dst.tensors.get(name)
        module, _, suffix = name.rpartition(".")
        if suffix == "bias" and module in out_perms:
            a = a[out_perms[module].to(torch.int64)]
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
            report.mismatches.append(f"{name}: differs ({b.dtype} {tuple(b.shape)} vs {a.dtype} {tuple(a.shape)})")
        report.tensors += 1
    for name in sorted(dst_names - set(src_names)):
        report.mismatches.append(f"{name}: in {dst.path} but not in {src.path}")
