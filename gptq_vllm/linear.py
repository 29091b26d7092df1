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
from dataclasses import dataclass
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
from .formats import bitpack, gptq, hopper, marlin
from .formats.act_order import effective_group_size, num_groups
from .formats.errors import FormatError
from .formats.gptq import GPTQTensors, QuantizedWeight
from .formats.kernel_layout import KernelWeight, Layout, from_kernel, to_kernel
from .kernels import ops, selection  # noqa: F401  (ops: apply calls torch.ops.mygptq.*)

logger = logging.getLogger(__name__)

_QKV_SHARDS = {"q": 0, "k": 1, "v": 2}


@dataclass(frozen=True)
class _Partition:
    """This rank's part of the layer, fixed at create_weights."""

    in_features: int  # K on this rank
    out_features: int  # N on this rank (sum of the fused outputs)
    full_in_features: int  # K of the whole layer
    full_out_features: list[int]  # N of each checkpoint module fused into the layer, before sharding
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
    """Wraps vLLM's weight loader for one parameter: records which shards arrived, and turns a shape
    mismatch (a bare assert deep in vLLM) into an error naming the checkpoint tensor and its shape."""

    def __init__(self, method: "MyGPTQLinearMethod", tensor: str, loader) -> None:
        self.method, self.tensor, self.loader = method, tensor, loader

    def __call__(self, param, loaded_weight: torch.Tensor, *args, **kwargs):
        shard_id = args[0] if args else kwargs.get("loaded_shard_id")
        # vLLM names a fused shard by index (gate_up), letter (qkv) or a tuple of indices.
        shards = [_QKV_SHARDS.get(s, s) for s in (shard_id if isinstance(shard_id, tuple) else (shard_id,))]
        try:
            self.loader(param, loaded_weight, *args, **kwargs)
        except (AssertionError, RuntimeError) as e:
            raise FormatError(self.method.shape_error(self.tensor, shards[0], loaded_weight, param)) from e
        self.method.loaded.setdefault(self.tensor, set()).update(shards)


@register_weight_loader_v2_supported_method
class MyGPTQLinearMethod(LinearMethodBase):
    """One quantized linear layer (or quantized lm_head); one instance per layer."""

    def __init__(self, scheme: LayerScheme, prefix: str, shard_names: list[str] | None = None) -> None:
        self.scheme = scheme
        self.prefix = prefix
        self.shard_names = shard_names or [prefix]
        self.loaded: dict[str, set] = {}
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
        self.part = _Partition(K, N, input_size, list(getattr(layer, "output_sizes", [output_size])),
                               row_parallel, all_groups, len(output_partition_sizes), params_dtype)
        self._check_partition(output_partition_sizes)
        loader = extra_weight_attrs["weight_loader"]
        ng = num_groups(input_size, G) if all_groups else num_groups(K, G)
        pf = Fraction(32, s.bits)  # codes per int32 word (32/3 for 3-bit, whose codes straddle words)

        def add(name: str, cls: type[BasevLLMParameter], data: torch.Tensor, **dims) -> None:
            layer.register_parameter(name, cls(data=data, weight_loader=_TrackedLoader(self, name, loader), **dims))

        if s.layout is Layout.MARLIN:
            # One 16-row Marlin tile of N columns is N*16*b/32 words; marlin_tile_size scales the shard
            # offsets of fused layers by that tile.
            add("qweight", PackedvLLMParameter,
                torch.empty(K // marlin.TILE_K, N * marlin.TILE_K * s.bits // 32, dtype=torch.int32),
                input_dim=0, output_dim=1, packed_dim=1, packed_factor=pf, marlin_tile_size=marlin.TILE_K)
        else:
            # GPTQ and ExLlama both pack along K: [K*b/32, N].
            add("qweight", PackedvLLMParameter, torch.empty(bitpack.packed_length(K, s.bits), N, dtype=torch.int32),
                input_dim=0, output_dim=1, packed_dim=0, packed_factor=pf)
        # Scales stay in fp32 until conversion: fp16 and bf16 checkpoint scales both fit exactly.
        scales = torch.empty(ng, N, dtype=torch.float32)
        if all_groups:
            add("scales", ChannelQuantScaleParameter, scales, output_dim=1)
        else:
            add("scales", GroupQuantScaleParameter, scales, input_dim=0, output_dim=1)
        if not (s.layout is Layout.MARLIN and s.sym):  # Marlin implies the symmetric zero
            zeros = torch.empty(ng, N * s.bits // 32, dtype=torch.int32)
            if all_groups:
                add("qzeros", PackedColumnParameter, zeros, output_dim=1, packed_dim=1, packed_factor=pf)
            else:
                add("qzeros", PackedvLLMParameter, zeros, input_dim=0, output_dim=1, packed_dim=1, packed_factor=pf)
        if not s.is_kernel_layout:
            add("g_idx", RowvLLMParameter, torch.empty(K, dtype=torch.int32), input_dim=0)
        elif s.desc_act:
            # The activation gather of a converted act-order module (absent where it was folded into the
            # producing layer).  It spans the full K on every rank: a row-parallel layer cannot use it.
            add("perm", BasevLLMParameter, torch.empty(input_size, dtype=torch.int32))

    def _check_partition(self, output_partition_sizes: list[int]) -> None:
        s, p = self.scheme, self.part
        if s.layout is Layout.MARLIN:
            k_mult, n_mult, why = marlin.TILE_K, marlin.TILE_N, "the Marlin tile (16 x 64)"
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

    # ---- load-time checks --------------------------------------------------------------------------------

    def _checkpoint_name(self, shard: int | None) -> str:
        if len(self.shard_names) == 1:
            return self.shard_names[0]
        return self.shard_names[shard] if shard is not None and shard < len(self.shard_names) else self.prefix

    def expected_shape(self, tensor: str, in_features: int, out_features: int) -> tuple[int, ...]:
        """Shape of a checkpoint tensor of one module with K = in_features, N = out_features."""
        s = self.scheme
        ng = num_groups(in_features, s.group_size)
        if tensor == "qweight" and s.layout is Layout.MARLIN:
            return in_features // marlin.TILE_K, out_features * marlin.TILE_K * s.bits // 32
        if tensor == "perm":
            return (in_features,)
        if s.is_kernel_layout and tensor in ("scales", "qzeros"):
            return {"scales": (ng, out_features), "qzeros": (ng, out_features * s.bits // 32)}[tensor]
        return gptq.expected_shapes(in_features, out_features, s.bits, s.group_size)[tensor]

    def shape_error(self, tensor: str, shard: int | None, loaded: torch.Tensor, param: torch.Tensor) -> str:
        s, p = self.scheme, self.part
        sizes = p.full_out_features
        n = sizes[shard] if shard is not None and shard < len(sizes) else sum(sizes)
        expected = self.expected_shape(tensor, p.full_in_features, n)
        return (f"{self._checkpoint_name(shard)}.{tensor}: checkpoint tensor has shape {tuple(loaded.shape)}, "
                f"expected {expected} for K={p.full_in_features}, N={n}, bits={s.bits}, "
                f"group_size={s.group_size} (this rank holds {tuple(param.shape)} of the layer); the checkpoint "
                f"does not match its quantization config")

    def _require(self, *tensors: str) -> None:
        for t in tensors:
            shards = self.loaded.get(t, set())
            if None in shards or len(shards) >= self.part.num_shards:
                continue
            names = [self._checkpoint_name(i) for i in range(self.part.num_shards) if i not in shards]
            why = ("; an act-order (desc_act=true) checkpoint needs it to know which group dequantizes each "
                   "input channel") if t == "g_idx" else ""
            raise FormatError(f"{', '.join(f'{n}.{t}' for n in names)}: missing from the checkpoint{why}")

    # ---- convert -----------------------------------------------------------------------------------------

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        kw = self._convert_kernel_layout(layer) if self.scheme.is_kernel_layout else self._convert_gptq(layer)
        if hasattr(layer, "g_idx"):
            delattr(layer, "g_idx")  # folded into perm / g_idx_sorted
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

    def _hopper_operands(self, kw: KernelWeight) -> hopper.HopperOperands | None:
        """The Hopper GEMM's scales (and zero term) for a Marlin layer on an sm_90 GPU, else None."""
        if kw.layout is not Layout.MARLIN or not selection.hopper_available(kw.qweight.device):
            return None
        rows = kw.qweight.shape[0] * marlin.TILE_K
        why = hopper.unsupported(bits=kw.bits, group_size=kw.group_size, in_rows=rows,
                                 g_idx_sorted=kw.g_idx_sorted is not None)
        if why is not None:
            logger.debug("mygptq: %s keeps the Marlin kernels at every batch size: %s", self.prefix, why)
            return None
        return hopper.operands(kw.qzeros, kw.scales, bits=kw.bits, group_size=kw.group_size, in_rows=rows)

    def _convert_gptq(self, layer: torch.nn.Module) -> KernelWeight:
        s, p, name = self.scheme, self.part, self.prefix
        self._require("qweight", "qzeros", "scales")
        K, N, G = p.in_features, p.out_features, s.group_size
        device = layer.qweight.device
        # Global input channels of this rank, for the g_idx a checkpoint without act-order implies.
        first = layer.qweight.tp_rank * K if p.row_parallel else 0
        rows = torch.arange(first, first + K, dtype=torch.int32, device=device)
        implied = rows // effective_group_size(p.full_in_features, G)
        if "g_idx" in self.loaded:
            self._require("g_idx")
            g_idx = layer.g_idx.data
        elif s.desc_act:
            self._require("g_idx")
        else:
            # Old GPTQ-for-LLaMa files have no g_idx; without act-order it can only be k // G.
            g_idx = implied
        qzeros, scales = layer.qzeros.data, layer.scales.data
        if s.sym:
            gptq.check_zero_format(qzeros, s.bits, N, s.zero_format, f"{name}.qzeros")
        if p.all_groups:
            # This rank's rows with the scales and zeros of every group: a shard (QuantizedWeight.validate).
            qw = QuantizedWeight(codes=bitpack.unpack_rows(layer.qweight.data, s.bits, K), scales=scales,
                                 zeros=gptq.decode_zeros(qzeros, s.bits, N, s.zero_format, f"{name}.qzeros"),
                                 g_idx=g_idx, bits=s.bits, group_size=G, sym=s.sym)
            qw.validate(name, shard=True)
        else:
            if p.row_parallel:
                # Scales were sharded along K, which is only right when g_idx is k // G.
                if not torch.equal(g_idx, implied):
                    raise FormatError(
                        f"{name}.g_idx: not k // group_size although the config says desc_act=false; the "
                        f"checkpoint has act-order: set desc_act: true in its quantization config")
                g_idx = implied - implied[0]
            qw = gptq.unpack(GPTQTensors(layer.qweight.data, qzeros, scales, g_idx), s.bits, G, s.sym,
                             s.zero_format, in_features=K, name=name)
        choice = selection.select(bits=s.bits, group_size=G, in_features=K, out_features=N,
                                  row_groups=p.all_groups and G != -1, dtype=p.act_dtype, device_type=device.type,
                                  name=name)
        logger.debug("mygptq: %s -> %s layout (%s)", name, choice.layout.value, choice.reason)
        return to_kernel(qw, choice.layout, scale_dtype=p.act_dtype)

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
                    f"{name}.perm: this row-parallel layer gathers its input by an act-order permutation, "
                    f"which cannot be split across tensor-parallel ranks; serve the GPTQ source checkpoint with "
                    f"--quantization mygptq (it repacks at load) or use tensor_parallel_size=1")
            perm = layer.perm.data
            if not torch.equal(torch.sort(perm).values, torch.arange(K, dtype=perm.dtype, device=perm.device)):
                raise FormatError(f"{name}.perm: not a permutation of range({K})")
        scales = layer.scales.data
        if s.layout is Layout.MARLIN and p.row_parallel:
            # The converter permuted the scales for the full K; a rank whose K is one group needs the
            # single-group permutation instead (formats.md §4.3).
            scales = marlin.permute_scales(marlin.unpermute_scales(scales, G, p.full_in_features), G, K)
        kw = KernelWeight(layout=s.layout, bits=s.bits, group_size=G, sym=s.sym, in_features=K, out_features=N,
                          qweight=layer.qweight.data, scales=scales.to(p.act_dtype),
                          qzeros=None if qzeros is None else qzeros.data, perm=perm, g_idx_sorted=None)
        try:
            from_kernel(kw)  # the inverse validates codes, zeros, scales (NaN) and shapes
        except FormatError as e:
            raise FormatError(f"{name}: {e}") from e
        return kw

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
