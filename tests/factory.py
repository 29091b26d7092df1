"""Small real models and GPTQ checkpoints built locally for the tests (there is no model hub here).

build_model writes a random-init Llama- or Qwen2-style model (build_moe: Mixtral, Qwen2-MoE, Qwen3-MoE)
with a real byte-level BPE tokenizer trained by `tokenizers`; write_gptq writes a GPTQ checkpoint of it
(RTN codes, optionally with an act-order g_idx shared by the modules that read the same input, like real
GPTQ output) together with the dequantized float model that transformers can run as the reference.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from converters.checkpoint.gptq_config import gptq_quantization_config
from converters.quantize.rtn import rtn_quantize
from converters.quantize.targets import quantizable_module
from gptq_vllm.formats import gptq
from gptq_vllm.formats import act_order
from gptq_vllm.formats.act_order import inverse_perm
from gptq_vllm.formats.gptq import QuantizedWeight, ZeroFormat
from gptq_vllm.formats.reference import dequantize

TOKENIZER_TEXT = """\
The river ran past the mill and under the old stone bridge, where the children waited for the boats.
In the morning the baker opened his shop; by noon the bread was gone and the town was quiet again.
A letter came from the city: the prices of wheat had risen, and the farmers argued late into the night.
She counted the coins twice, wrote the numbers in her book, 1, 2, 3, 10, 42, 100, and closed the lid.
Questions and answers, stories and songs: every evening the lamp burned until the last page was read.
"""

ARCHS = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
}

# Modules that read the same input share one Hessian in GPTQ, hence one act-order permutation.
SHARED_INPUT = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "gate_proj": "mlp_in", "up_proj": "mlp_in"}


def build_tokenizer(directory: Path, vocab_size: int = 512) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TOKENIZER_TEXT.splitlines() * 4, trainer)
    tok.save(str(directory / "tokenizer.json"))
    template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant: {% endif %}")
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "pad_token": "<pad>", "model_max_length": 2048, "chat_template": template,
    }))
    return tok.get_vocab_size()


def build_model(directory: str | Path, arch: str = "llama", hidden: int = 128, layers: int = 2, heads: int = 4,
                kv_heads: int = 2, intermediate: int = 256, seed: int = 0, dtype: torch.dtype = torch.float16) -> Path:
    """A random-init causal LM saved with safetensors and its tokenizer; returns the directory."""
    import transformers

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(directory)
    cls_name, model_type = ARCHS[arch]
    config = transformers.AutoConfig.for_model(
        model_type, vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, intermediate_size=intermediate, max_position_embeddings=2048,
        bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=False, architectures=[cls_name],
    )
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(config)
    # Wider than the default init so that quantization error shows up in the logits.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.to(dtype).save_pretrained(directory, safe_serialization=True)
    return directory


MOE_ARCHS = {  # model_type: (class, config keys of expert count and expert width)
    "mixtral": ("MixtralForCausalLM", "num_local_experts", "intermediate_size"),
    "qwen2_moe": ("Qwen2MoeForCausalLM", "num_experts", "moe_intermediate_size"),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "num_experts", "moe_intermediate_size"),
}


def build_moe(directory: str | Path, arch: str = "mixtral", hidden: int = 64, layers: int = 2, experts: int = 4,
              top_k: int = 2, intermediate: int = 64, router_offsets: dict[int, float] | None = None, seed: int = 0,
              dtype: torch.dtype = torch.float16) -> Path:
    """A random-init sparse MoE causal LM (transformers 5 fused experts, saved per expert as on the Hub).

    router_offsets {expert: c} add c to that expert's router logit on every token, so tests can starve
    an expert: every token embedding gets a constant channel 0 (so the normed router input there is
    ~sqrt(hidden) on every token), and the expert's router row reads it with weight c / sqrt(hidden).
    """
    import transformers

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(directory)
    cls_name, n_key, i_key = MOE_ARCHS[arch]
    extra = {"shared_expert_intermediate_size": 2 * intermediate, "norm_topk_prob": True} if arch == "qwen2_moe" else {}
    config = transformers.AutoConfig.for_model(
        arch, vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, num_experts_per_tok=top_k, max_position_embeddings=2048, bos_token_id=0,
        eos_token_id=1, pad_token_id=2, tie_word_embeddings=False, architectures=[cls_name],
        **{n_key: experts, i_key: intermediate}, **extra)
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
        if router_offsets:
            model.model.embed_tokens.weight[:, 0] = 1.0  # ~12x the other channels: dominates the RMS norm
            for layer in model.model.layers:
                for e, c in router_offsets.items():
                    layer.mlp.gate.weight[e, 0] = c / hidden**0.5
    model.to(dtype).save_pretrained(directory, safe_serialization=True)
    return directory


def _act_order_perm(name: str, K: int, generator: torch.Generator, cache: dict) -> torch.Tensor:
    layer = re.search(r"layers\.(\d+)\.", name).group(1)
    key = (layer, SHARED_INPUT.get(name.rsplit(".", 1)[-1], name))
    if key not in cache:
        cache[key] = torch.randperm(K, generator=generator).to(torch.int32)
    return cache[key]


def quantize_weight(W: torch.Tensor, bits: int, group_size: int, sym: bool, perm: torch.Tensor | None) -> QuantizedWeight:
    """RTN of an nn.Linear weight [N, K]; with perm, groups are formed over the permuted input channels."""
    if perm is None:
        return rtn_quantize(W, bits, group_size, sym)
    return rtn_quantize(W[:, perm.to(torch.int64)], bits, group_size, sym).permute_rows(inverse_perm(perm))


def write_gptq(float_dir: str | Path, out_dir: str | Path, bits: int = 4, group_size: int = 128, sym: bool = True,
               desc_act: bool = False, zero_format: ZeroFormat = ZeroFormat.V1, seed: int = 0,
               reference_dir: str | Path | None = None, config_style: str = "config") -> dict[str, QuantizedWeight]:
    """Write a GPTQ checkpoint of float_dir to out_dir; optionally the dequantized float model to reference_dir.

    config_style: "config" puts quantization_config in config.json (and quantize_config.json), "autogptq"
    writes quantize_config.json only, TheBloke style.
    """
    float_dir, out_dir = Path(float_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = load_file(str(float_dir / "model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    perms: dict = {}
    quantized: dict[str, QuantizedWeight] = {}
    packed, dequant = {}, {}
    for name, t in tensors.items():
        module = quantizable_module(name, tuple(t.shape))
        if module is None:
            packed[name] = dequant[name] = t
            continue
        perm = _act_order_perm(module, t.shape[1], gen, perms) if desc_act and group_size != -1 else None
        qw = quantize_weight(t, bits, group_size, sym, perm)
        quantized[module] = qw
        packed.update(gptq.pack(qw, zero_format).as_dict(module))
        dequant[name] = dequantize(qw).t().to(t.dtype).contiguous()
    save_file(packed, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    qcfg = gptq_quantization_config(bits, group_size, sym, desc_act, zero_format)
    config = json.loads((float_dir / "config.json").read_text())
    if config_style == "config":
        config["quantization_config"] = qcfg
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    (out_dir / "quantize_config.json").write_text(json.dumps(qcfg, indent=2))
    for f in float_dir.iterdir():
        if f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy2(f, out_dir / f.name)
    if reference_dir is not None:
        reference_dir = Path(reference_dir)
        shutil.copytree(float_dir, reference_dir, dirs_exist_ok=True)
        save_file(dequant, str(reference_dir / "model.safetensors"), metadata={"format": "pt"})
    return quantized


def random_weight(bits, group_size, sym, act, K=256, N=96, seed=0, zero_min=0):
    """A random canonical weight with edge values: codes 0 and 2^b-1, zeros at both ends of their range."""
    g = torch.Generator().manual_seed(seed)
    ng = act_order.num_groups(K, group_size)
    codes = torch.randint(0, 2**bits, (K, N), generator=g, dtype=torch.int32)
    codes[0, :] = 0
    codes[1, :] = 2**bits - 1
    if sym:
        zeros = torch.full((ng, N), 2 ** (bits - 1), dtype=torch.int32)
    else:
        zeros = torch.randint(zero_min, 2**bits, (ng, N), generator=g, dtype=torch.int32)
        zeros[0, 0] = zero_min
        zeros[-1, -1] = 2**bits - 1
    scales = (torch.rand(ng, N, generator=g) * 0.02 + 1e-3).to(torch.float16)
    g_idx = act_order.default_g_idx(K, group_size)
    if act and group_size != -1:
        g_idx = g_idx[torch.randperm(K, generator=g)]
    return QuantizedWeight(codes, scales, zeros, g_idx, bits, group_size, sym)
