"""The `mygptq` linear method: loads a layer's tensors with vLLM's TP-aware parameters, converts them once
to the kernel layout, and runs one custom op per forward.

Two kinds of checkpoint (config.LayerScheme says which):

  GPTQ       qweight [K*b/32, N], qzeros [NG, N*b/32], scales [NG, N], g_idx [K]; converted at load with
             the format core (gptq.unpack -> QuantizedWeight -> kernel_layout.to_kernel), in the layout
             kernels/selection.py picks.
  converted  what `gptq-convert` writes: to_kernel(..., pad=False).tensors() minus g_idx; loaded as
             stored, only validated (formats.md and converters/checkpoint/emit.py).

Tensor parallelism (vLLM's parameter classes do the slicing): qweight shards along N for column-parallel
and merged (qkv, gate_up) layers and along K for row-parallel ones.  A row-parallel rank keeps every
group's scales and zeros when its slice of K is not made of whole groups: act-order (g_idx is sharded
with K and keeps global group ids), group_size -1, or a group straddling the rank boundary.  Its rows then
carry group ids that are not runs of G, so the kernel gets g_idx_sorted (kernel_layout's shard path).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, replace
from fractions import Fraction

import torch
from vllm.model_executor.layers.linear import LinearMethodBase, register_weight_loader_v2_supported_method
from vllm.model_executor.parameter import (
    BasevLLMParameter,
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    PackedColumnParameter,
    PackedvLLMParameter,
    RowvLLMParameter,
)

from .config import LayerScheme
from .formats import bitpack, compressed_tensors, gptq, hopper, marlin
from .formats import validate
from .formats.act_order import check_g_idx, effective_group_size, num_groups
from .formats.errors import FormatError
from .formats.gptq import QuantizedWeight
from .formats.kernel_layout import KernelWeight, Layout, to_kernel
from .formats.kernel_layout import expected_shapes as kernel_expected_shapes
from .kernels import ops, selection  # noqa: F401  (ops: apply calls torch.ops.mygptq.*)

logger = logging.getLogger(__name__)

_QKV_SHARDS = {"q": 0, "k": 1, "v": 2}
_ROW_PARALLEL_WHY = ("this row-parallel layer cannot honour: tensor parallelism split its scales along K by "
                     "k // group_size; set desc_act: true in the quantization config (the tensors stay valid) or "
                     "serve with tensor_parallel_size=1")


def _add_group_params(add, scales: str, zeros: str | None, N: int, ng: int, bits: int, pf: Fraction,
                      all_groups: bool, transposed: bool) -> None:
    """Register the scales [NG, N] and, unless `zeros` is None, the zeros packed along N [NG, N*b/32].

    transposed: compressed-tensors stores both as [N, NG] and [N*b/32, NG].  They are sharded along the
    groups, unless this rank keeps every group (all_groups).
    """
    group_dim, out_dim = (1, 0) if transposed else (0, 1)
    groups = {} if all_groups else {"input_dim": group_dim}

    def shape(n: int) -> tuple[int, int]:
        return (n, ng) if transposed else (ng, n)

    # fp32 until conversion: fp16 and bf16 checkpoint scales both fit exactly.
    add(scales, ChannelQuantScaleParameter if all_groups else GroupQuantScaleParameter,
        torch.empty(shape(N), dtype=torch.float32), output_dim=out_dim, **groups)
    if zeros is not None:
        add(zeros, PackedColumnParameter if all_groups else PackedvLLMParameter,
            torch.empty(shape(bitpack.packed_length(N, bits)), dtype=torch.int32), output_dim=out_dim,
            packed_dim=out_dim, packed_factor=pf, **groups)


@dataclass(frozen=True)
class _Partition:
    """This rank's part of the layer, fixed at create_weights."""

    in_features: int  # K on this rank
    out_features: int  # N on this rank (sum of the fused outputs)
    full_in_features: int  # K of the whole layer
    full_out_features: list[int]  # N of each checkpoint module fused into the layer, before sharding
    output_partition_sizes: list[int]  # N of each fused part on this rank
    row_parallel: bool  # K is split across ranks
    all_groups: bool  # scales/zeros hold every group of the full K (not sharded along K)
    num_shards: int  # checkpoint modules fused into this layer (as loaded on this rank)
    act_dtype: torch.dtype


@dataclass(frozen=True)
class _Gemm:
    """What `apply` passes to the op besides tensors; plain data so Dynamo treats it as constant."""

    layout: Layout
    bits: int
    group_size: int
    in_features: int
    out_features: int


class _TrackedLoader:
    """Wraps vLLM's weight loader for one parameter.  Before vLLM slices the checkpoint tensor for this rank,
    it checks the tensor's dtype and full shape (validate's rules, naming the checkpoint's own module, not
    the fused layer), keeps the act-order tensors of every shard (small: K ints) for the checks that need
    the whole of them, and records which shards arrived."""

    def __init__(self, method: "MyGPTQLinearMethod", tensor: str, loader) -> None:
        self.method, self.tensor, self.loader = method, tensor, loader

    def __call__(self, param, loaded_weight: torch.Tensor, *args, **kwargs):
        shard_id = args[0] if args else kwargs.get("loaded_shard_id")
        # vLLM names a fused shard by index (gate_up), letter (qkv) or a tuple of indices.
        shards = [_QKV_SHARDS.get(s, s) for s in (shard_id if isinstance(shard_id, tuple) else (shard_id,))]
        m = self.method
        with m.named_errors():
            m.check_loaded(self.tensor, shards, loaded_weight)
            if self.tensor in ("g_idx", "perm", "weight_g_idx"):
                m.act_order[shards[0]] = loaded_weight.detach().to("cpu", copy=True)
            if self.tensor == "weight_shape":  # per module, so not a parameter of the fused layer
                m.weight_shapes[shards[0]] = loaded_weight.detach().to("cpu", copy=True)
                m.loaded.setdefault(self.tensor, set()).update(shards)
                return
            try:
                self.loader(param, loaded_weight, *args, **kwargs)
            except (AssertionError, RuntimeError) as e:  # a shape check_loaded could not foresee
                raise FormatError(f"{m.checkpoint_name(shards)}.{self.tensor}: checkpoint tensor of shape "
                                  f"{tuple(loaded_weight.shape)} does not fit this rank's {tuple(param.shape)} "
                                  f"({e})") from e
        m.loaded.setdefault(self.tensor, set()).update(shards)


def _cat_columns(weights: list[QuantizedWeight]) -> QuantizedWeight:
    """The checkpoint modules of a fused layer side by side along N (they share g_idx: check_fused)."""
    if len(weights) == 1:
        return weights[0]
    return replace(weights[0], codes=torch.cat([w.codes for w in weights], dim=1),
                   scales=torch.cat([w.scales for w in weights], dim=1),
                   zeros=torch.cat([w.zeros for w in weights], dim=1))


@register_weight_loader_v2_supported_method
class MyGPTQLinearMethod(LinearMethodBase):
    """One quantized linear layer (or quantized lm_head); one instance per layer."""

    def __init__(self, scheme: LayerScheme, prefix: str, shard_names: list[str] | None = None,
                 files: dict[str, str] | None = None) -> None:
        self.scheme = scheme
        self.prefix = prefix
        self.shard_names = shard_names or [prefix]
        self.files = files or {}  # checkpoint module -> its file(s), for the messages (config.module_files)
        self.loaded: dict[str, set] = {}
        self.act_order: dict[int | None, torch.Tensor] = {}  # shard -> its whole g_idx / perm as loaded
        self.weight_shapes: dict[int | None, torch.Tensor] = {}  # shard -> compressed-tensors weight_shape
        self.part: _Partition | None = None
        self.gemm: _Gemm | None = None

    # ---- create -----------------------------------------------------------------------------------------

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs) -> None:
        s = self.scheme
        K, N = input_size_per_partition, sum(output_partition_sizes)
        row_parallel = input_size != K
        G = s.group_size
        if s.is_kernel_layout:
            # Converted checkpoints have no g_idx: rows are stored in kernel order, groups are runs of G.
            all_groups = row_parallel and G == -1
        else:
            all_groups = row_parallel and (s.desc_act or G == -1 or K % G != 0)
        # N of each checkpoint module before sharding (the partitions scaled back up when the layer has no list).
        full_out = getattr(layer, "output_sizes", None) or [n * output_size // N for n in output_partition_sizes]
        self.part = _Partition(K, N, input_size, list(full_out),
                               list(output_partition_sizes), row_parallel, all_groups, len(output_partition_sizes), params_dtype)
        self._check_partition(output_partition_sizes)
        loader = extra_weight_attrs["weight_loader"]
        ng = num_groups(input_size, G) if all_groups else num_groups(K, G)
        pf = Fraction(32, s.bits)  # codes per int32 word (32/3 for 3-bit, whose codes straddle words)

        def add(name: str, cls: type[BasevLLMParameter], data: torch.Tensor, **dims) -> None:
            layer.register_parameter(name, cls(data=data, weight_loader=_TrackedLoader(self, name, loader), **dims))

        if s.compressed:
            self._create_compressed(add, K, N, ng, pf, all_groups)
            return
        if s.layout is Layout.MARLIN:
            # A qweight row holds unit_rows(b) rows of K (one 16-row tile for 4/8 bit, a unit of 2/4 k-tiles
            # for 2/3 bit): N columns of it are N*unit_rows*b/32 words, so vLLM's shard offsets of fused layers
            # (N / packed_factor * marlin_tile_size) come out in words with marlin_tile_size = unit_rows.
            add("qweight", PackedvLLMParameter,
                torch.empty(marlin.qweight_shape(K, N, s.bits), dtype=torch.int32),
                input_dim=0, output_dim=1, packed_dim=1, packed_factor=pf, marlin_tile_size=marlin.unit_rows(s.bits))
        else:
            # GPTQ and ExLlama both pack along K: [K*b/32, N].
            add("qweight", PackedvLLMParameter, torch.empty(bitpack.packed_length(K, s.bits), N, dtype=torch.int32),
                input_dim=0, output_dim=1, packed_dim=0, packed_factor=pf)
        marlin_sym = s.layout is Layout.MARLIN and s.sym  # Marlin implies the symmetric zero
        zero_bits = marlin.ZERO_BITS[s.bits] if s.layout is Layout.MARLIN else s.bits
        _add_group_params(add, "scales", None if marlin_sym else "qzeros", N, ng, zero_bits,
                          Fraction(32, zero_bits), all_groups, transposed=False)
        if not s.is_kernel_layout:
            add("g_idx", RowvLLMParameter, torch.empty(K, dtype=torch.int32), input_dim=0)
        else:
            # The activation gather of a converted act-order module, whatever desc_act says (absent where
            # it was folded into the producing layer, or without act-order).  It spans the full K on every
            # rank: a row-parallel layer cannot use it.
            add("perm", BasevLLMParameter, torch.empty(input_size, dtype=torch.int32))

    def _create_compressed(self, add, K: int, N: int, ng: int, pf: Fraction, all_groups: bool) -> None:
        """compressed-tensors pack-quantized parameters: the GPTQ tensors transposed (formats.md §6)."""
        s = self.scheme
        add("weight_packed", PackedvLLMParameter, torch.empty(N, bitpack.packed_length(K, s.bits), dtype=torch.int32),
            input_dim=1, output_dim=0, packed_dim=1, packed_factor=pf)
        _add_group_params(add, "weight_scale", None if s.sym else "weight_zero_point", N, ng, s.bits, pf,
                          all_groups, transposed=True)
        # Registered even without actorder: a checkpoint may hold a trivial one (our writer does for act-order
        # checkpoints), and vLLM fails on a tensor without a parameter.
        add("weight_g_idx", RowvLLMParameter, torch.empty(K, dtype=torch.int32), input_dim=0)
        # (N, K) of each module: checked and kept by the tracked loader, never sliced (int32 or int64).
        add("weight_shape", BasevLLMParameter, torch.empty(2, dtype=torch.int64))

    def _check_partition(self, output_partition_sizes: list[int]) -> None:
        s, p = self.scheme, self.part
        if s.layout is Layout.MARLIN:
            # A shard of qweight must be whole rows of it (row-parallel) and whole 64-column strips.
            k_mult, n_mult = marlin.unit_rows(s.bits), marlin.TILE_N
            unit = "tile" if k_mult == marlin.TILE_K else "unit"
            why = f"the {s.bits}-bit Marlin {unit} of qweight ({k_mult} x {n_mult})"
        else:
            k_mult = n_mult = bitpack.block_shape(s.bits)[0]
            why = f"the {s.bits}-bit packing block ({k_mult} codes)"
        bad_n = [n for n in output_partition_sizes if n % n_mult]
        if p.in_features % k_mult or bad_n:
            raise ValueError(
                f"mygptq: {self.prefix}: this rank's part of the layer (K={p.in_features}, N parts "
                f"{output_partition_sizes}) does not align with {why}: K must be a multiple of {k_mult} and each "
                f"N part of {n_mult}; use a tensor-parallel size that divides the layer into aligned parts")
        if s.is_kernel_layout and p.row_parallel and s.group_size != -1 and p.in_features % s.group_size:
            raise ValueError(
                f"mygptq: {self.prefix}: K={p.in_features} on this rank is not a multiple of group_size "
                f"{s.group_size}, which a converted checkpoint needs under tensor parallelism; serve the GPTQ "
                f"source with --quantization mygptq or use a smaller tensor-parallel size")

    # ---- load-time checks (gptq_vllm.formats.validate: the rules every gptq-convert command applies) ------

    def checkpoint_name(self, shards: list) -> str:
        """The checkpoint's module behind shard(s) of this layer (q_proj, not qkv_proj)."""
        if len(self.shard_names) == 1 or len(shards) != 1 or shards[0] is None or shards[0] >= len(self.shard_names):
            return self.prefix if len(self.shard_names) > 1 else self.shard_names[0]
        return self.shard_names[shards[0]]

    @contextmanager
    def named_errors(self):
        """Put the file of the module an error names in front of it, as the gptq-convert readers do."""
        try:
            yield
        except FormatError as e:
            head = str(e).split(": ")[0].split(" ")[0]  # "module.tensor" or "module"
            where = self.files.get(head, self.files.get(head.rpartition(".")[0]))
            if where is None or str(e).startswith(where):
                raise
            raise FormatError(f"{where}: {e}") from e

    def _shard_dims(self, shards: list) -> tuple[int, int]:
        """(K, N) of the whole checkpoint tensor behind shard(s) of this layer."""
        sizes = self.part.full_out_features
        n = sum(sizes[s] for s in shards) if None not in shards and max(shards) < len(sizes) else sum(sizes)
        return self.part.full_in_features, n

    def expected_shape(self, tensor: str, K: int, N: int) -> tuple[int, ...]:
        s = self.scheme
        if s.compressed:
            return compressed_tensors.expected_shapes(K, N, s.bits, s.group_size)[tensor]
        if s.is_kernel_layout:
            return kernel_expected_shapes(s.layout, s.bits, s.group_size, s.sym, K, N)[tensor]
        return gptq.expected_shapes(K, N, s.bits, s.group_size)[tensor]

    def check_loaded(self, tensor: str, shards: list, loaded: torch.Tensor) -> None:
        """dtype and full shape of one checkpoint tensor, before vLLM slices it for this rank."""
        s = self.scheme
        name = f"{self.checkpoint_name(shards)}.{tensor}"
        table = validate.CT_DTYPES if s.compressed else validate.KERNEL_DTYPES if s.is_kernel_layout else validate.GPTQ_DTYPES
        validate.check_dtype(name, loaded, table)
        K, N = self._shard_dims(shards)
        if tensor == "weight_shape":
            validate.check_weight_shape(self.checkpoint_name(shards), loaded, K, N)
            return
        validate.check_shape(name, loaded, self.expected_shape(tensor, K, N), K=K, N=N, bits=s.bits,
                             group_size=s.group_size)

    def _require(self, *tensors: str) -> None:
        s = self.scheme
        for t in tensors:
            shards = self.loaded.get(t, set())
            if None in shards or len(shards) >= self.part.num_shards:
                continue
            i = next(i for i in range(self.part.num_shards) if i not in shards)
            K, N = self._shard_dims([i])
            raise validate.missing(f"{self.checkpoint_name([i])}.{t}", self.expected_shape(t, K, N),
                                   validate.ACT_ORDER_WHY if t in ("g_idx", "weight_g_idx") else "", K=K, N=N, bits=s.bits,
                                   group_size=s.group_size)

    def _split(self, t: torch.Tensor | None, per_column: Fraction, dim: int = 1) -> list[torch.Tensor | None]:
        """This rank's tensor of the layer cut into its checkpoint modules' parts along N (dimension dim)."""
        if t is None:
            return [None] * self.part.num_shards
        if self.part.num_shards == 1:
            return [t]
        widths = [int(n * per_column) for n in self.part.output_partition_sizes]
        return list(torch.split(t, widths, dim=dim))

    def _shard_act_order(self, i: int) -> torch.Tensor | None:
        return self.act_order.get(i if self.part.num_shards > 1 else next(iter(self.act_order), None))

    # ---- convert -----------------------------------------------------------------------------------------

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        with self.named_errors():
            kw = self._convert_kernel_layout(layer) if self.scheme.is_kernel_layout else self._convert_gptq(layer)
        for name in ("g_idx", "weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx", "weight_shape"):
            if hasattr(layer, name):
                delattr(layer, name)  # folded into the kernel tensors (perm / g_idx_sorted for g_idx)
        for name in ("qweight", "scales", "qzeros", "perm", "g_idx_sorted"):
            if hasattr(layer, name):
                delattr(layer, name)
            t = getattr(kw, name)
            # Plain Parameters (not vLLM's loader classes): Dynamo sees ordinary tensors, None when absent.
            layer.register_parameter(name, None if t is None else torch.nn.Parameter(t, requires_grad=False))
        hop = self._hopper_operands(kw)
        for name, t in (("hopper_scales", hop and hop.scales), ("hopper_zeros", hop and hop.zeros)):
            layer.register_parameter(name, None if t is None else torch.nn.Parameter(t, requires_grad=False))
        self.gemm = _Gemm(kw.layout, kw.bits, kw.group_size, self.part.in_features, self.part.out_features)
        self.loaded.clear()
        self.act_order.clear()

    def _hopper_operands(self, kw: KernelWeight) -> hopper.HopperOperands | None:
        """The Hopper GEMM's scales (and zero term) for a Marlin layer on an sm_90 GPU, else None."""
        if kw.layout is not Layout.MARLIN or not selection.hopper_available(kw.qweight.device):
            return None
        rows = marlin.stored_rows(kw.qweight, kw.bits)
        why = hopper.unsupported(bits=kw.bits, group_size=kw.group_size, in_rows=rows,
                                 g_idx_sorted=kw.g_idx_sorted is not None)
        if why is not None:
            logger.debug("mygptq: %s keeps the Marlin kernels at every batch size: %s", self.prefix, why)
            return None
        return hopper.operands(kw.qzeros, kw.scales, bits=kw.bits, group_size=kw.group_size, in_rows=rows)

    def _convert_gptq(self, layer: torch.nn.Module) -> KernelWeight:
        """GPTQ (or compressed-tensors) tensors -> validated canonical weight -> the kernel layout selection picks."""
        s, p = self.scheme, self.part
        ct = s.compressed
        g_name = "weight_g_idx" if ct else "g_idx"
        K, N, G = p.in_features, p.out_features, s.group_size
        act_order = s.desc_act and G != -1
        # In the order validate.gptq_weight / compressed_weight look for them, so the first missing is named alike.
        if ct:
            self._require("weight_packed", "weight_scale", *([] if s.sym else ["weight_zero_point"]))
        else:
            self._require("qweight", "qzeros", "scales")
        if g_name in self.loaded or act_order:
            self._require(g_name)  # every shard's, or none: an act-order layer refuses to guess
        if ct:
            self._require("weight_shape")
        packed = layer.weight_packed if ct else layer.qweight
        device = packed.device
        # Global input channels of this rank, for the g_idx a checkpoint without act-order implies.
        first = packed.tp_rank * K if p.row_parallel else 0
        rows = torch.arange(first, first + K, dtype=torch.int32, device=device)
        implied = rows // effective_group_size(p.full_in_features, G)
        if ct:
            zp = getattr(layer, "weight_zero_point", None)
            parts = zip(self._split(packed.data, Fraction(1), 0), self._split(None if zp is None else zp.data,
                        Fraction(s.bits, 32), 0), self._split(layer.weight_scale.data, Fraction(1), 0))
        else:
            parts = zip(self._split(packed.data, Fraction(1)), self._split(layer.qzeros.data, Fraction(s.bits, 32)),
                        self._split(layer.scales.data, Fraction(1)))
        weights = []
        for i, ((qweight, qzeros, scales), n) in enumerate(zip(parts, p.output_partition_sizes)):
            # Each checkpoint module of the layer is validated on its own, under its own name, by the rules
            # of validate.gptq_weight / compressed_weight; its whole g_idx (as loaded) by act_order.check_g_idx.
            name = self.checkpoint_name([i])
            whole = self._shard_act_order(i)
            if whole is not None:
                check_g_idx(whole, p.full_in_features, G, f"{name}.{g_name}")
            g_idx = implied if whole is None else whole.to(device=device, dtype=torch.int32)[first:first + K]
            if p.all_groups:
                # This rank's rows with the scales and zeros of every group: a shard (QuantizedWeight.validate).
                qw = self._all_groups_shard(name, qweight, qzeros, scales, g_idx, n)
            else:
                if p.row_parallel:
                    # Scales were sharded along K (create_weights, from desc_act): right only for k // G.
                    if whole is not None:
                        validate.check_implied_g_idx(whole, G, f"{name}.{g_name}", _ROW_PARALLEL_WHY)
                    g_idx = implied - implied[0]
                if ct:
                    t = {"weight_packed": qweight, "weight_scale": scales, "weight_zero_point": qzeros,
                         "weight_g_idx": g_idx, "weight_shape": torch.tensor([n, K])}
                    qw = validate.compressed_weight({f"{name}.{k}": v for k, v in t.items()}, name, s.bits, G, s.sym,
                                                    act_order, K, n)
                else:
                    qw = validate.gptq_weight({"qweight": qweight, "qzeros": qzeros, "scales": scales,
                                               "g_idx": g_idx}, name, s.bits, G, s.sym, s.zero_format, act_order, K, n)
            weights.append(qw)
        if len(self.act_order) > 1:
            validate.check_fused({self.checkpoint_name([i]): g for i, g in self.act_order.items()}, g_name)
        qw = _cat_columns(weights)
        choice = selection.select(bits=s.bits, group_size=G, in_features=K, out_features=N,
                                  row_groups=p.all_groups and G != -1, dtype=p.act_dtype, device_type=device.type,
                                  name=self.prefix)
        logger.debug("mygptq: %s -> %s layout (%s)", self.prefix, choice.layout.value, choice.reason)
        return to_kernel(qw, choice.layout, scale_dtype=p.act_dtype)

    def _all_groups_shard(self, name: str, qweight, qzeros, scales, g_idx, n: int) -> QuantizedWeight:
        """A row-parallel rank's rows with the scales and zeros of every group (QuantizedWeight.validate(shard))."""
        s, K = self.scheme, self.part.in_features
        if s.compressed:  # the GPTQ tensors transposed; zeros exact (formats.md §6)
            codes = bitpack.unpack_rows(qweight.t().contiguous(), s.bits, K, dtype=torch.uint8)
            scales = scales.t().contiguous()
            zeros = (torch.full(scales.shape, gptq.sym_zero(s.bits), dtype=torch.int32, device=scales.device)
                     if s.sym else bitpack.unpack_rows(qzeros, s.bits, n).t().contiguous())
        else:
            if s.sym:
                gptq.check_zero_format(qzeros, s.bits, n, s.zero_format, f"{name}.qzeros")
            codes = bitpack.unpack_rows(qweight, s.bits, K, dtype=torch.uint8)
            zeros = gptq.decode_zeros(qzeros, s.bits, n, s.zero_format, f"{name}.qzeros")
        qw = QuantizedWeight(codes=codes, scales=scales, zeros=zeros, g_idx=g_idx, bits=s.bits,
                             group_size=s.group_size, sym=s.sym)
        qw.validate(name, shard=True)
        return qw

    def _convert_kernel_layout(self, layer: torch.nn.Module) -> KernelWeight:
        s, p, name = self.scheme, self.part, self.prefix
        qzeros = getattr(layer, "qzeros", None)
        self._require("qweight", "scales", *(["qzeros"] if qzeros is not None else []))
        K, N, G = p.in_features, p.out_features, s.group_size
        selection.check_stored(s.layout, bits=s.bits, group_size=G, in_features=K, out_features=N,
                               dtype=p.act_dtype, device_type=layer.qweight.device.type, name=name)
        perm = None
        if "perm" in self.loaded:
            self._require("perm")
            if p.row_parallel:
                raise FormatError(
                    f"{self.checkpoint_name([None])}.perm: this row-parallel layer gathers its input by an act-order "
                    f"permutation, which cannot be split across tensor-parallel ranks; serve the GPTQ source "
                    f"checkpoint with --quantization mygptq (it repacks at load) or use tensor_parallel_size=1")
            perm = layer.perm.data
        scales = layer.scales.data
        if s.layout is Layout.MARLIN and p.row_parallel:
            # The converter permuted the scales for the full K; a rank whose K is one group needs the
            # single-group permutation instead (formats.md §4.3).
            scales = marlin.permute_scales(marlin.unpermute_scales(scales, G, p.full_in_features), G, K)
        scales = scales.to(p.act_dtype)
        marlin_layout = s.layout is Layout.MARLIN
        qweight_per_column = Fraction(marlin.unit_rows(s.bits) * s.bits, 32) if marlin_layout else Fraction(1)
        zero_bits = marlin.ZERO_BITS[s.bits] if marlin_layout else s.bits
        parts = zip(self._split(layer.qweight.data, qweight_per_column), self._split(scales, Fraction(1)),
                    self._split(None if qzeros is None else qzeros.data, Fraction(zero_bits, 32)),
                    p.output_partition_sizes)
        g_idx = {}
        for i, (qweight, sc, qz, n) in enumerate(parts):
            # validate.kernel_weight per checkpoint module: shapes, dtypes, `perm` a permutation, and the
            # inverse layout (codes, zeros, finite scales), under the module's own name.
            shard = self.checkpoint_name([i])
            w = validate.kernel_weight({"qweight": qweight, "scales": sc, "qzeros": qz,
                                        "perm": self._shard_act_order(i)}, shard, s.layout, s.bits, G, s.sym, K, n)
            g_idx[shard] = w.g_idx
        if len(g_idx) > 1 and self.act_order:
            validate.check_fused(g_idx, "perm")
        return KernelWeight(layout=s.layout, bits=s.bits, group_size=G, sym=s.sym, in_features=K, out_features=N,
                            qweight=layer.qweight.data, scales=scales,
                            qzeros=None if qzeros is None else qzeros.data, perm=perm, g_idx_sorted=None)

    # ---- forward -----------------------------------------------------------------------------------------

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        g = self.gemm
        x2 = x.reshape(-1, x.shape[-1])
        if g.layout is Layout.MARLIN:
            y = torch.ops.mygptq.marlin_gemm(x2, layer.qweight, layer.scales, layer.qzeros, layer.perm,
                                             layer.g_idx_sorted, layer.hopper_scales, layer.hopper_zeros, g.bits,
                                             g.group_size, g.in_features, g.out_features)
        else:
            y = torch.ops.mygptq.exllama_gemm(x2, layer.qweight, layer.qzeros, layer.scales, layer.perm,
                                              layer.g_idx_sorted, g.bits, g.group_size, g.in_features,
                                              g.out_features)
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], g.out_features)

    def tie_weights(self, layer: torch.nn.Module, embed_tokens: torch.nn.Module):
        raise ValueError(f"mygptq: {self.prefix} is quantized and cannot share the float input embedding "
                         f"(tie_word_embeddings=true); untie it or leave lm_head unquantized (lm_head: false)")
