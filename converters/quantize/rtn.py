"""Round-to-nearest quantization of one linear weight: the baseline GPTQ is measured against."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from gptq_vllm.formats.act_order import default_g_idx, effective_group_size, num_groups
from gptq_vllm.formats.gptq import QuantizedWeight, ZeroFormat
from gptq_vllm.formats.gptq import pack as gptq_pack

from ..checkpoint.gptq_config import gptq_quantization_config
from ..checkpoint.safetensors_dir import NON_WEIGHT_FILES, SafetensorsDir
from ..checkpoint.writer import CheckpointWriter
from .grid import find_params, quantize_codes
from .targets import quantizable_module


def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int, sym: bool,
                 scale_dtype: torch.dtype = torch.float16) -> QuantizedWeight:
    """nn.Linear weight [N, K] -> QuantizedWeight with min-max groups of G consecutive input channels."""
    N, K = weight.shape
    G = effective_group_size(K, group_size)
    ng = num_groups(K, group_size)
    w = weight.to(torch.float32)
    codes = torch.empty(N, K, dtype=torch.int32)
    scales = torch.empty(ng, N, dtype=torch.float32)
    zeros = torch.empty(ng, N, dtype=torch.int32)
    for g in range(ng):
        cols = slice(g * G, min(K, (g + 1) * G))
        s, z = find_params(w[:, cols], bits, sym, scale_dtype)
        codes[:, cols] = quantize_codes(w[:, cols], s, z, bits)
        scales[g], zeros[g] = s, z
    return QuantizedWeight(
        codes=codes.t().contiguous(),
        scales=scales.to(scale_dtype),
        zeros=zeros,
        g_idx=default_g_idx(K, group_size),
        bits=bits,
        group_size=group_size,
        sym=sym,
    )


def quantize_checkpoint_rtn(source, destination, bits: int, group_size: int, sym: bool,
                            zero_format: ZeroFormat = ZeroFormat.V1, overwrite: bool = False) -> Path:
    """Stream a float checkpoint tensor by tensor into a GPTQ checkpoint quantized with RTN."""
    src = SafetensorsDir(source)
    qcfg = gptq_quantization_config(bits, group_size, sym, desc_act=False, zero_format=zero_format,
                                    meta={"method": "rtn"})
    with CheckpointWriter(destination, overwrite=overwrite) as writer:
        for name in tqdm(src.names(), desc="rtn", unit="tensor"):
            module = quantizable_module(name, src.shape(name))
            if module is None:
                writer.add(name, src.get(name))
                continue
            qw = rtn_quantize(src.get(name), bits, group_size, sym)
            writer.add_all(gptq_pack(qw, zero_format).as_dict(module))
        config = src.config()
        config["quantization_config"] = qcfg
        writer.write_json("config.json", config)
        writer.write_json("quantize_config.json", qcfg)
        for f in NON_WEIGHT_FILES:
            if f != "config.json" and (src.path / f).exists():
                writer.copy_file(src.path / f)
        return writer.finish()
