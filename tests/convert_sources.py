"""Source checkpoints in every dialect `gptq-convert` reads, built from the factory's tiny models.

Each builder writes a directory the way the named tool lays it out (file names, config files, keys), with
RTN codes from tests/factory.py; act-order perms are shared by modules reading the same input, as in GPTQ.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from converters.checkpoint.emit import Target, quantization_config
from converters.checkpoint.gptq_config import gptq_quantization_config
from converters.quantize.targets import quantizable_module
from factory import _act_order_perm, build_model, quantize_weight, write_gptq
from gptq_vllm.formats import compressed_tensors, gptq
from gptq_vllm.formats.gptq import ZeroFormat


def float_model(base: Path) -> Path:
    """One tiny Llama (hidden 128, intermediate 256, 2 layers) per test session, built on first use."""
    d = base / "float-llama"
    if not (d / "model.safetensors").exists():
        build_model(d)
    return d


def tree_hash(directory: Path) -> str:
    """Hash of every file name and content under directory (to prove a source is left untouched)."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(directory).rglob("*") if p.is_file()):
        h.update(str(f.relative_to(directory)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def autogptq(float_dir: Path, out: Path, bits=4, group_size=128, desc_act=True, sym=True,
             zero_format=ZeroFormat.V1, file_name="gptq_model-4bit-128g.safetensors") -> Path:
    """TheBloke-era AutoGPTQ: quantize_config.json only, weights in gptq_model-{b}bit-{g}g.safetensors."""
    write_gptq(float_dir, out, bits=bits, group_size=group_size, sym=sym, desc_act=desc_act,
               zero_format=zero_format, config_style="autogptq")
    cfg = json.loads((out / "quantize_config.json").read_text())
    cfg.pop("meta")
    cfg.pop("pack_dtype")
    (out / "quantize_config.json").write_text(json.dumps(cfg))
    if file_name != "model.safetensors":
        (out / "model.safetensors").rename(out / file_name)
    return out


def transformers_style(float_dir: Path, out: Path, **kw) -> Path:
    """transformers/optimum: quantization_config in config.json, no quantize_config.json."""
    write_gptq(float_dir, out, config_style="config", **kw)
    (out / "quantize_config.json").unlink()
    return out


def shard(directory: Path, parts: int = 2) -> Path:
    """Split model.safetensors into HF-style shards with model.safetensors.index.json."""
    tensors = load_file(str(directory / "model.safetensors"))
    names = sorted(tensors)
    weight_map = {}
    for i in range(parts):
        fname = f"model-{i + 1:05d}-of-{parts:05d}.safetensors"
        chunk = names[i::parts]
        save_file({n: tensors[n] for n in chunk}, str(directory / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in chunk})
    (directory / "model.safetensors").unlink()
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


GPTQMODEL_DYNAMIC = {
    r"+:.*\.down_proj": {"bits": 8, "group_size": 128},
    r"-:.*layers\.1\.self_attn\.o_proj": {},
}


def gptqmodel(float_dir: Path, out: Path, bits=4, group_size=64, desc_act=True, sym=True,
              zero_format=ZeroFormat.V2, dynamic=GPTQMODEL_DYNAMIC) -> Path:
    """GPTQModel 4.x: `format`, `pack_dtype`, `meta.quantizer` and per-module `dynamic` overrides."""
    out.mkdir(parents=True, exist_ok=True)
    from gptq_vllm.formats.quant_config import parse

    scheme = parse({"bits": bits, "group_size": group_size, "sym": sym, "dynamic": dynamic}, "test")
    gen = torch.Generator().manual_seed(1)
    perms: dict = {}
    packed = {}
    for name, t in load_file(str(float_dir / "model.safetensors")).items():
        module = quantizable_module(name, tuple(t.shape))
        p = scheme.params(module) if module else None
        if p is None:
            packed[name] = t
            continue
        perm = _act_order_perm(module, t.shape[1], gen, perms) if desc_act else None
        qw = quantize_weight(t, p.bits, p.group_size, p.sym, perm)
        packed.update(gptq.pack(qw, zero_format).as_dict(module))
    save_file(packed, str(out / "model.safetensors"), metadata={"format": "pt"})
    qcfg = gptq_quantization_config(bits, group_size, sym, desc_act, zero_format, dynamic=dynamic,
                                    meta={"quantizer": ["gptqmodel:4.1.0"], "uri": "https://github.com/modelcloud/gptqmodel"})
    qcfg["format"] = qcfg.pop("checkpoint_format")
    config = json.loads((float_dir / "config.json").read_text())
    config["quantization_config"] = qcfg
    (out / "config.json").write_text(json.dumps(config))
    (out / "quantize_config.json").write_text(json.dumps(qcfg))
    _copy_tokenizer(float_dir, out)
    return out


def compressed(float_dir: Path, out: Path, bits=4, group_size=64, sym=False, desc_act=True,
               shape_dtype=torch.int64) -> Path:
    """llm-compressor pack-quantized: weight_packed / weight_scale / weight_zero_point / weight_g_idx, and
    weight_shape as int64, as llm-compressor writes it."""
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(2)
    perms: dict = {}
    tensors = {}
    for name, t in load_file(str(float_dir / "model.safetensors")).items():
        module = quantizable_module(name, tuple(t.shape))
        if module is None:
            tensors[name] = t
            continue
        perm = _act_order_perm(module, t.shape[1], gen, perms) if desc_act else None
        tensors.update(compressed_tensors.to_tensors(quantize_weight(t, bits, group_size, sym, perm), module,
                                                     write_g_idx=desc_act or None))
        tensors[f"{module}.weight_shape"] = tensors[f"{module}.weight_shape"].to(shape_dtype)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((float_dir / "config.json").read_text())
    config["quantization_config"] = quantization_config(Target.COMPRESSED_TENSORS, bits, group_size, sym, desc_act)
    (out / "config.json").write_text(json.dumps(config))
    _copy_tokenizer(float_dir, out)
    return out


def _copy_tokenizer(float_dir: Path, out: Path) -> None:
    for f in float_dir.iterdir():
        if f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy2(f, out / f.name)


def edit_tensors(directory: Path, edit, file_name: str | None = None) -> None:
    """Rewrite one safetensors file of a checkpoint through edit(dict of tensors) (to break it on purpose)."""
    f = directory / (file_name or next(p.name for p in sorted(directory.glob("*.safetensors"))))
    tensors = load_file(str(f))
    edit(tensors)
    save_file(tensors, str(f), metadata={"format": "pt"})


def first(tensors: dict, pattern: str) -> str:
    return next(n for n in sorted(tensors) if re.search(pattern, n))
