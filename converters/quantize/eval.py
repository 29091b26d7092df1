"""`gptq-convert eval`: perplexity of a float or quantized checkpoint, and per-layer output error.

Quantized checkpoints (GPTQ v1/v2, compressed-tensors, mygptq) are read by the checkpoint readers (so
validated exactly like inspect / convert / verify and the plugin do) and dequantized into the float
transformers model through the format core (gptq_vllm.formats.reference), so the number measures the
weights exactly as written, independent of any kernel.

Perplexity protocol (the one of gutenberg-llama-27m's metrics.json): the text is read whole and
tokenized once without special tokens, cut into non-overlapping windows of seqlen tokens (the
remainder dropped), and perplexity is exp of the mean NLL over positions 1..seqlen-1 of every window.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from gptq_vllm.formats.errors import FormatError
from gptq_vllm.formats.reference import dequantize
from gptq_vllm.formats.validate import config_sources

from ..checkpoint.convert import by_parent
from ..checkpoint.readers import open_checkpoint
from .capture import Checkpoint, decoder_layers, params_on_meta
from .moe import fused_experts
from .moe_names import FUSED, ExpertNames, resolve, stored_name
from .pipeline import ROUTER
from .rtn import rtn_quantize


def _dequantized(reader, prefix: str, K: int, N: int, g_idx: dict[str, torch.Tensor]) -> torch.Tensor:
    """The float weight [N, K] of one quantized module, read and validated like every gptq-convert command."""
    w = reader.load(prefix)
    if (w.in_features, w.out_features) != (K, N):
        raise FormatError(f"{reader.where(prefix)}: {prefix}: the checkpoint holds (K, N) = "
                          f"({w.in_features}, {w.out_features}), expected ({K}, {N}) from config.json")
    g_idx[prefix] = w.g_idx  # for the fused-layer check (validate.check_fused)
    return dequantize(w).t()


def _experts_state(model, tensors: dict[str, torch.Tensor], reader, quantized_modules: dict,
                   g_idx: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The fused expert parameters of the model, from per-expert tensors (dequantized where quantized) or
    fused ones; consumes what it uses from tensors.  model.expert_names records where each came from."""
    state = {}
    model.expert_names = {}
    for name, mod in fused_experts(model).items():
        names = resolve(name, tensors, model.config.model_type)
        model.expert_names[name] = names
        for param in FUSED:
            fused = getattr(mod, param)
            if names.fused:
                state[f"{name}.{param}"] = tensors.pop(f"{name}.{param}")
                continue
            rows, K = fused.shape[1] // len(names.projections(param)), fused.shape[2]

            def weight(m: str, rows=rows, K=K) -> torch.Tensor:
                if f"{m}.weight" in tensors:
                    return tensors.pop(f"{m}.weight")
                quantized_modules[m] = reader.params(m)
                w = _dequantized(reader, m, K, rows, g_idx)
                for key in [k for k in tensors if k.startswith(f"{m}.")]:
                    del tensors[key]
                return w

            state[f"{name}.{param}"] = names.assemble(param, fused.shape[0], weight)
    return state


def load_model(model_dir: Path, device: torch.device, dtype: torch.dtype | None = None):
    """The transformers model of a float or quantized checkpoint (dequantized); model.quantized_modules
    maps each quantized module (checkpoint name; experts one per expert) to its (bits, group_size, sym)."""
    import transformers
    from transformers.initialization import no_init_weights

    # The checks of every entry point: config.json present, config files agreeing (validate.config_sources);
    # quantized modules are then read by the same readers as inspect / convert / verify.
    quantized = bool(config_sources(model_dir)[1])
    reader = open_checkpoint(model_dir) if quantized else None
    g_idx: dict[str, torch.Tensor] = {}
    config = transformers.AutoConfig.from_pretrained(model_dir)
    if dtype is None:
        dtype = torch.float32 if device.type == "cpu" else torch.float16
    for key in ("quantization_config", "compression_config"):
        if hasattr(config, key):
            delattr(config, key)  # we dequantize ourselves; transformers must not look for GPTQ backends
    with no_init_weights(), params_on_meta():
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    ckpt = Checkpoint(model_dir)
    tensors = ckpt.read(ckpt.names())
    state: dict[str, torch.Tensor] = {}
    model.quantized_modules = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or f"{name}.weight" in tensors or reader is None:
            continue
        if not any(k.startswith(f"{name}.") for k in tensors):
            continue  # tied lm_head
        state[f"{name}.weight"] = _dequantized(reader, name, mod.in_features, mod.out_features, g_idx)
        model.quantized_modules[name] = reader.params(name)
        for key in [k for k in tensors if k.startswith(f"{name}.") and k != f"{name}.bias"]:
            del tensors[key]
    state.update(_experts_state(model, tensors, reader, model.quantized_modules, g_idx))
    for modules in by_parent(list(g_idx)).values():
        reader.check_fused({m: g_idx[m] for m in modules})
    for key in model.state_dict():  # tensors saved under their Hub names (Mixtral's block_sparse_moe.gate)
        stored = stored_name(key, tensors) if key not in state else None
        if stored is not None:
            state[key] = tensors.pop(stored)
    state.update(tensors)
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
    if config.get_text_config().tie_word_embeddings:
        model.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"{model_dir}: tensors missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(device).eval()


def windows(tokenizer, text: str, seqlen: int) -> torch.Tensor:
    ids = torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)
    n = ids.numel() // seqlen
    if n == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    return ids[: n * seqlen].view(n, seqlen)


@torch.no_grad()
def perplexity(model, tokenizer, text: str, seqlen: int = 512, batch_size: int = 8, progress: bool = True) -> dict:
    rows = windows(tokenizer, text, seqlen)
    device = next(model.parameters()).device
    nll = 0.0
    with tqdm(total=rows.shape[0], desc="eval", unit="window", disable=not progress) as bar:
        for i in range(0, rows.shape[0], batch_size):
            x = rows[i:i + batch_size].to(device)
            logits = model(input_ids=x, use_cache=False).logits.float()
            nll += float(F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="sum"))
            bar.update(x.shape[0])
    scored = rows.shape[0] * (seqlen - 1)
    return {"ppl": math.exp(nll / scored), "nll": nll / scored, "windows": rows.shape[0], "tokens_scored": scored}


def _rtn_layer(layer: nn.Module, prefix: str, specs: dict, expert_names: dict[str, ExpertNames]) -> nn.Module:
    """A copy of a float layer with every module quantized in the checkpoint rounded to nearest instead."""
    rtn = lambda w, p: dequantize(rtn_quantize(w.float(), p.bits, p.group_size, p.sym)).t().to(w.dtype)  # noqa: E731
    out = copy.deepcopy(layer)
    out._forward_hooks.clear()  # the copy must not re-enter layer_report's hook
    for n, m in out.named_modules():
        p = specs.get(f"{prefix}.{n}")
        if isinstance(m, nn.Linear) and p is not None and not ROUTER.search(n):
            m.weight.data = rtn(m.weight, p)
    for n, m in fused_experts(out).items():
        names = expert_names[f"{prefix}.{n}"]
        for param in FUSED:
            fused = getattr(m, param).data
            for e in range(fused.shape[0]):
                for k, rows in zip(names.projections(param), fused[e].chunk(len(names.projections(param)))):
                    p = specs.get(names.expert(e, k))
                    if p is not None:
                        rows.copy_(rtn(rows, p))
    return out


@torch.no_grad()
def layer_report(base, quant, tokenizer, text: str, seqlen: int, nwindows: int = 16, batch_size: int = 8,
                 progress: bool = True) -> list[dict]:
    """Per decoder layer: relative output error of the quantized layer and of RTN (same settings), both
    fed the float model's inputs to that layer, so each number isolates that layer's quantization."""
    rows = windows(tokenizer, text, seqlen)[:nwindows]
    device = next(base.parameters()).device
    name, layers = decoder_layers(base)
    _, qlayers = decoder_layers(quant)
    sums = [[0.0, 0.0, 0.0] for _ in layers]

    def hook(i):
        def after(module, args, kwargs, output):
            ref = (output[0] if isinstance(output, tuple) else output).float()
            rtn = _rtn_layer(module, f"{name}.{i}", quant.quantized_modules, quant.expert_names)
            for k, layer in enumerate((qlayers[i], rtn)):
                y = layer(*args, **kwargs)
                y = (y[0] if isinstance(y, tuple) else y).float()
                sums[i][k] += float((y - ref).pow(2).sum())
            sums[i][2] += float(ref.pow(2).sum())
        return after

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with tqdm(total=rows.shape[0], desc="layer report", unit="window", disable=not progress) as bar:
            for i in range(0, rows.shape[0], batch_size):
                base.base_model(input_ids=rows[i:i + batch_size].to(device), use_cache=False)
                bar.update(min(batch_size, rows.shape[0] - i))
    finally:
        for h in handles:
            h.remove()
    return [{"layer": i, "error": (q / r) ** 0.5, "rtn_error": (t / r) ** 0.5} for i, (q, t, r) in enumerate(sums)]
