"""`gptq-convert convert`: a quantized checkpoint -> our kernel layout (or GPTQ v1/v2, compressed-tensors).

The data flows checkpoint -> reader (format detected, every tensor validated) -> canonical QuantizedWeight
-> emit (target tensors and config) -> CheckpointWriter, module by module (two parents at a time, on two
threads), so memory is bounded by the largest modules, not the model.  The modules of one parent (a
layer's self_attn or mlp) are converted together, because act-order ties them (formats.md §3):

  * modules that vLLM fuses into one layer (validate.FUSED_INPUTS: q/k/v, gate/up) read one input, which
    the kernel gathers once: their g_idx (so their act-order permutations) must be identical, and
    validate.check_fused checks it;
  * the input of an MLP's down projection is silu(gate(x)) * up(x), elementwise, so its permutation is
    absorbed exactly by permuting the output channels of gate and up (formats.md §3.4 B): down_proj is
    then stored with its rows permuted and no `perm` at all, and needs no gather at run time.
"""

from __future__ import annotations

import ctypes
import json
import sys
import time
from contextlib import contextmanager
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from gptq_vllm.formats import compressed_tensors
from gptq_vllm.formats.act_order import act_order_perm, is_trivial
from gptq_vllm.formats.errors import FormatError
from gptq_vllm.formats.gptq import ZeroFormat
from gptq_vllm.formats.kernel_layout import Layout, default_layout
from gptq_vllm.kernels.selection import MARLIN_GROUP_SIZES, MARLIN_K_MULTIPLE, MARLIN_N_MULTIPLE

from ..quantize.targets import quantizable_module
from .emit import Target, module_tensors, quantization_config
from .gptq_config import QUANTIZER_TAG
from .hub import Source
from .readers import Checkpoint, ModuleParams, open_checkpoint
from .readers.config import GPTQ_CONFIG_FILES
from .writer import DEFAULT_SHARD_BYTES, CheckpointWriter

# consumer -> the producers whose outputs are combined elementwise into its input (Llama / Mixtral MLPs).
ABSORBING = {"down_proj": ("gate_proj", "up_proj"), "w2": ("w1", "w3")}
# The work is memory-bound byte shuffling that intra-op threads do not speed up (measured: they slow it
# down); instead COMPUTE_WORKERS parents are converted at once, each on one thread, and the output is
# written by the writer's background thread.
COMPUTE_THREADS = 1
COMPUTE_WORKERS = 2
NOT_COPIED_SUFFIXES = (".safetensors", ".index.json", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")


@dataclass
class Report:
    destination: Path
    modules: int = 0
    act_order_modules: int = 0
    perms_stored: int = 0
    perms_absorbed: int = 0
    bytes_in: int = 0
    seconds: float = 0.0


def convert(source: Source, destination: str | Path, target: Target = Target.MYGPTQ, layout: Layout | None = None,
            checkpoint_format: ZeroFormat | None = None, shard_bytes: int = DEFAULT_SHARD_BYTES,
            overwrite: bool = False, progress: bool = True) -> Report:
    """Convert the checkpoint at `source` into `destination` (which appears only when complete)."""
    start = time.perf_counter()
    destination = Path(destination)
    dst, src = destination.resolve(), source.path.resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        raise FormatError(f"{destination}: the destination must not be, contain or lie inside the source {src}")
    ckpt = open_checkpoint(source.path, checkpoint_format)
    if target is Target.MYGPTQ:
        layout = layout or default_layout(ckpt.config.base.bits)
    elif layout is not None:
        raise FormatError("--layout applies to --to mygptq only")
    preflight(ckpt, target, layout)
    report = Report(destination)
    threads = torch.get_num_threads()
    torch.set_num_threads(COMPUTE_THREADS)
    try:
        with _reused_heap(), CheckpointWriter(destination, shard_bytes, overwrite, background=True) as writer:
            _Converter(ckpt, source, writer, target, layout, report, progress).run()
            writer.finish()
    finally:
        torch.set_num_threads(threads)
    report.seconds = time.perf_counter() - start
    return report


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_GLIBC_TRIM_THRESHOLD, _GLIBC_MMAP_MAX = 128 * 1024, 65536


@contextmanager
def _reused_heap():
    """Keep freed tensor buffers in one glibc heap for reuse while converting (Linux/glibc; else no-op).

    Every module allocates tens of MB of fresh buffers.  By default glibc serves each with its own mmap
    and unmaps it on free, so every page is faulted in and zeroed by the kernel again: measured as about
    a third of the converter's CPU time.  With one arena (worker threads' arenas would mmap blocks over
    64 MB anyway), no mmap and no trimming, freed buffers are reused from the heap instead.  The peak
    heap stays bounded by the modules in flight.  Afterwards mmap and trimming are restored and the heap
    is trimmed; the one-arena limit stays (glibc fixes it once threads have used it).
    """
    libc = None
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None)
            libc.gnu_get_libc_version  # glibc only
            mallopt, trim = libc.mallopt, libc.malloc_trim
        except (OSError, AttributeError):
            libc = None
    if libc is None:
        yield
        return
    mallopt(_M_ARENA_MAX, 1)
    mallopt(_M_MMAP_MAX, 0)
    mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield
    finally:
        mallopt(_M_MMAP_MAX, _GLIBC_MMAP_MAX)
        mallopt(_M_TRIM_THRESHOLD, _GLIBC_TRIM_THRESHOLD)
        trim(ctypes.c_size_t(0))


def preflight(ckpt: Checkpoint, target: Target, layout: Layout | None) -> None:
    """Refuse, before anything is written, what the target cannot hold (from the tensor headers)."""
    for module in ckpt.modules():
        p = ckpt.params(module)
        if target is Target.COMPRESSED_TENSORS:
            if p.bits not in compressed_tensors.CT_BITS:
                raise FormatError(f"{ckpt.where(module)}: {module} is {p.bits}-bit; compressed-tensors "
                                  f"pack-quantized holds {compressed_tensors.CT_BITS}-bit weights here")
            # act-order needs no per-module config there: weight_g_idx is written for every module.
            if replace(p, desc_act=ckpt.config.base.desc_act) != ckpt.config.base:
                raise FormatError(f"{ckpt.where(module)}: {module} has its own parameters ({p}) from a dynamic "
                                  f"rule, which one compressed-tensors config group cannot express; use --to mygptq "
                                  f"or --to gptq-v2")
        if target is Target.MYGPTQ and layout is Layout.MARLIN:
            _check_marlin(ckpt, module, p)


def _check_marlin(ckpt: Checkpoint, module: str, p: ModuleParams) -> None:
    hint = "use --layout exllama, or --to gptq-v2 to keep a GPTQ checkpoint"
    where = f"{ckpt.where(module)}: {module}"
    if p.group_size not in MARLIN_GROUP_SIZES:
        raise FormatError(f"{where}: the Marlin kernels take group_size in {MARLIN_GROUP_SIZES}, "
                          f"not {p.group_size}; {hint}")
    dims = ckpt.model_dims(module) or ckpt.dims(module)  # config.json's sizes first, as vLLM builds the layer
    if dims is None:
        return  # a tensor is missing: load() will name it
    K, N = dims
    if K % MARLIN_K_MULTIPLE or N % MARLIN_N_MULTIPLE:
        raise FormatError(f"{where}: the Marlin layout needs K % {MARLIN_K_MULTIPLE} == 0 and "
                          f"N % {MARLIN_N_MULTIPLE} == 0, got K={K}, N={N}; {hint}")


def by_parent(modules: list[str]) -> dict[str, list[str]]:
    """Modules grouped by their parent (model.layers.0.mlp -> [.gate_proj, .up_proj, .down_proj]), in order."""
    parents: dict[str, list[str]] = {}
    for module in modules:
        parents.setdefault(module.rpartition(".")[0], []).append(module)
    return parents


def absorptions(modules: list[str]) -> dict[str, list[str]]:
    """consumer -> producers, for every consumer of ABSORBING whose producers are quantized siblings."""
    by_leaf = {m.rpartition(".")[2]: m for m in modules}
    return {by_leaf[consumer]: [by_leaf[p] for p in producers] for consumer, producers in ABSORBING.items()
            if consumer in by_leaf and all(p in by_leaf for p in producers)}


def _dedup(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


@dataclass
class _Module:
    """One converted module: its output tensors and what act-order did to it."""

    name: str
    tensors: dict[str, torch.Tensor]
    bias: torch.Tensor | None
    act_order: bool
    absorbed: bool


class _Converter:
    def __init__(self, ckpt: Checkpoint, source: Source, writer: CheckpointWriter, target: Target,
                 layout: Layout | None, report: Report, progress: bool):
        self.ckpt, self.source, self.writer = ckpt, source, writer
        self.target, self.layout, self.report = target, layout, report
        names = [n for m in ckpt.modules() for n in ckpt.module_tensors(m)] + ckpt.passthrough()
        report.bytes_in = ckpt.nbytes(names)
        self.bar = tqdm(total=report.bytes_in, unit="B", unit_scale=True, unit_divisor=1024, desc="convert",
                        disable=not progress, leave=False)
        self.written: set[str] = set()
        # compressed-tensors: a config saying actorder "group" needs weight_g_idx in every module.
        self.write_g_idx = True if target is Target.COMPRESSED_TENSORS and ckpt.has_act_order() else None

    def run(self) -> None:
        """Parents are converted on COMPUTE_WORKERS threads (torch releases the GIL) and written in order."""
        with self.bar, ThreadPoolExecutor(COMPUTE_WORKERS, thread_name_prefix="convert") as pool:
            pending: deque[Future] = deque()
            try:
                for modules in by_parent(self.ckpt.modules()).values():
                    pending.append(pool.submit(self._convert_parent, modules))
                    if len(pending) > COMPUTE_WORKERS:
                        self._write(pending.popleft().result())
                while pending:
                    self._write(pending.popleft().result())
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
            for name in self.ckpt.passthrough():
                if name not in self.written:
                    self._add(name, self.ckpt.tensors.get(name))
            self._write_configs()
            self._copy_files()

    def _add(self, name: str, tensor: torch.Tensor) -> None:
        self.writer.add(name, tensor)
        self.written.add(name)
        self.bar.update(self.ckpt.tensors.tensor_nbytes(name))

    def _write(self, results: list[_Module]) -> None:
        for r in results:
            self.report.modules += 1
            self.report.act_order_modules += r.act_order
            self.report.perms_absorbed += r.absorbed
            self.report.perms_stored += r.act_order and not r.absorbed and self.target is Target.MYGPTQ
            self.writer.add_all(r.tensors)
            self.bar.update(self.ckpt.nbytes(self.ckpt.module_tensors(r.name)))
            if r.bias is not None:
                self._add(f"{r.name}.bias", r.bias)

    def _convert_parent(self, modules: list[str]) -> list[_Module]:
        """The quantized modules of one parent: consumers first, so their producers can absorb their perm."""
        absorbing = absorptions(modules) if self.target is Target.MYGPTQ else {}
        out_perms: dict[str, torch.Tensor] = {}
        g_idx: dict[str, torch.Tensor] = {}
        results = []
        for module in [*absorbing, *(m for m in modules if m not in absorbing)]:
            w = self.ckpt.load(module, out_perm=out_perms.get(module))
            perm = None if is_trivial(w.g_idx, w.group_size) else act_order_perm(w.g_idx)
            g_idx[module] = w.g_idx
            absorbed = perm is not None and module in absorbing
            if absorbed:
                out_perms.update({producer: perm for producer in absorbing[module]})
            bias = self.ckpt.tensors.get(f"{module}.bias") if f"{module}.bias" in self.ckpt.tensors else None
            if bias is not None and module in out_perms:
                bias = bias[out_perms[module].to(torch.int64)]
            tensors = module_tensors(w, module, self.target, self.layout, perm_absorbed=absorbed,
                                     write_g_idx=self.write_g_idx)
            results.append(_Module(module, tensors, bias, perm is not None, absorbed))
        self.ckpt.check_fused(g_idx)  # every target: a checkpoint vLLM would serve wrong is refused
        return results

    def _write_configs(self) -> None:
        c = self.ckpt.config
        modules = self.ckpt.modules()
        meta = {
            "quantizer": _dedup([*c.quantizer, QUANTIZER_TAG]),
            "converter": QUANTIZER_TAG,
            "source": {**self.source.describe(), "format": self.ckpt.describe()},
        }
        if self.source.repo_id is None:
            # The directory's name only: an absolute local path would leak when the checkpoint is published.
            meta["source"]["source"] = self.source.path.name
        qcfg = quantization_config(
            self.target, c.base.bits, c.base.group_size, c.base.sym,
            desc_act=self.report.act_order_modules > 0, layout=self.layout, ignore=self._unquantized_linears(),
            dynamic=c.dynamic or None, lm_head=any(m.rpartition(".")[2] == "lm_head" for m in modules),
            meta=meta,
        )
        config_json = self.source.path / "config.json"
        config = json.loads(config_json.read_text()) if config_json.exists() else {}
        for holder in (config, config.get("text_config") or {}):
            holder.pop("quantization_config", None)
            holder.pop("compression_config", None)
        config["quantization_config"] = qcfg
        self.writer.write_json("config.json", config)
        if self.target in (Target.GPTQ_V1, Target.GPTQ_V2):
            self.writer.write_json("quantize_config.json", qcfg)

    def _unquantized_linears(self) -> list[str]:
        """Linear layers left in float (compressed-tensors `ignore`): lm_head and dynamic "-:" skips."""
        ignore = [] if "lm_head" in self.ckpt.modules() else ["lm_head"]
        for name in self.ckpt.passthrough():
            module = quantizable_module(name, self.ckpt.tensors.shape(name))
            if module is not None:
                ignore.append(module)
        return ignore

    def _copy_files(self) -> None:
        """Tokenizer, generation config, README, ...: every top-level file that is not weights or a config we rewrite."""
        rewritten = {"config.json", *GPTQ_CONFIG_FILES}
        for f in sorted(self.source.path.iterdir()):
            if (f.is_file() and not f.name.startswith(".") and f.name not in rewritten
                    and not f.name.endswith(NOT_COPIED_SUFFIXES)):
                self.writer.copy_file(f)
