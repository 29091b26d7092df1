"""The `mygptq` quantization config: every config dialect, overrides, dynamic rules, registration."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from dataclasses import replace

import pytest

pytest.importorskip("vllm")

import gptq_vllm  # noqa: E402
from converters.checkpoint.emit import Target, quantization_config  # noqa: E402
from gptq_vllm.formats.gptq import ZeroFormat  # noqa: E402
from gptq_vllm.formats.kernel_layout import Layout  # noqa: E402
from gptq_vllm.formats.quant_config import check_unit_layout  # noqa: E402

gptq_vllm.register()
from gptq_vllm.config import LayerScheme, MyGPTQConfig, module_matches  # noqa: E402

LLAMA_PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}

# Config files as the tools write them (formats.md §2).
AUTOGPTQ = {"bits": 4, "group_size": 128, "damp_percent": 0.01, "desc_act": True, "static_groups": False,
            "sym": True, "true_sequential": True, "model_name_or_path": None, "model_file_base_name": "model",
            "quant_method": "gptq", "checkpoint_format": "gptq"}
THEBLOKE = {"bits": 4, "group_size": 128, "damp_percent": 0.1, "desc_act": True, "sym": True,
            "true_sequential": True, "model_name_or_path": None, "model_file_base_name": "model",
            "quant_method": "gptq"}
GPTQMODEL_V4 = {"bits": 4, "dynamic": {r"+:.*\.1\..*": {"bits": 8}, r"-:.*\.0\.mlp\..*": {}}, "group_size": 128,
                "desc_act": False, "sym": True, "lm_head": False, "quant_method": "gptq",
                "checkpoint_format": "gptq_v2", "pack_dtype": "int32",
                "meta": {"quantizer": ["gptqmodel:4.1.0"], "damp_percent": 0.05, "static_groups": False,
                         "true_sequential": True, "mse": 0.0, "v2": False, "v2_alpha": 0.25}}
GPTQMODEL_MAIN = {"bits": 8, "group_size": 32, "desc_act": False, "sym": False, "method": "gptq",
                  "format": "gptq_v2", "checkpoint_format": "gptq_v2", "quant_method": "gptq", "pack_dtype": "int32",
                  "meta": {"quantizer": ["gptqmodel:5.6.12"], "act_group_aware": True}}
OPTIMUM = {"quant_method": "gptq", "bits": 4, "tokenizer": None, "dataset": "c4", "group_size": 128,
           "damp_percent": 0.1, "desc_act": False, "sym": True, "true_sequential": True, "use_cuda_fp16": False,
           "model_seqlen": 2048, "block_name_to_quantize": "model.layers", "module_name_preceding_first_block": None,
           "batch_size": 1, "pad_token_id": None, "use_exllama": True, "max_input_length": None,
           "exllama_config": {"version": 1}, "cache_block_outputs": True, "format": "gptq",
           "modules_in_block_to_quantize": [["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"],
                                            ["mlp.up_proj", "mlp.gate_proj"]]}


def parse(cfg: dict) -> MyGPTQConfig:
    c = MyGPTQConfig.from_config(json.loads(json.dumps(cfg)))
    c.packed_modules_mapping.update(LLAMA_PACKED)
    return c


def test_register_is_idempotent_and_registers_config_and_ops():
    import torch
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config

    gptq_vllm.register()
    gptq_vllm.register()
    assert get_quantization_config("mygptq") is MyGPTQConfig
    assert QUANTIZATION_METHODS.count("mygptq") == 1
    assert hasattr(torch.ops.mygptq, "marlin_gemm") and hasattr(torch.ops.mygptq, "exllama_gemm")


def test_import_touches_neither_vllm_nor_cuda():
    code = ("import sys, torch, gptq_vllm; assert 'vllm' not in sys.modules; gptq_vllm.register(); "
            "assert 'vllm' in sys.modules; assert not torch.cuda.is_initialized()")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_config_pickles_for_the_workers():
    c = parse(GPTQMODEL_V4)
    back = pickle.loads(pickle.dumps(c))
    for prefix in ("model.layers.0.mlp.down_proj", "model.layers.1.self_attn.qkv_proj", "model.layers.2.mlp.up_proj"):
        assert back.layer_scheme(prefix) == c.layer_scheme(prefix)


def test_autogptq_quantize_config():
    c = parse(AUTOGPTQ)
    assert c.base == LayerScheme(4, 128, True, True, ZeroFormat.V1, None)
    assert c.get_config_filenames() == ["quantize_config.json"]


def test_autogptq_synonyms_and_missing_sym_default():
    c = parse({"w_bit": 8, "q_group_size": 64, "desc_act": False})
    assert (c.base.bits, c.base.group_size, c.base.sym, c.base.zero_format) == (8, 64, True, ZeroFormat.V1)


def test_thebloke_config_defaults_to_v1():
    assert parse(THEBLOKE).base == LayerScheme(4, 128, True, True, ZeroFormat.V1, None)


def test_gptqmodel_v4_dynamic_rules():
    c = parse(GPTQMODEL_V4)
    assert c.base.zero_format is ZeroFormat.V2
    assert c.layer_scheme("model.layers.0.mlp.gate_up_proj") is None  # "-:" skips
    assert c.layer_scheme("model.layers.0.mlp.down_proj") is None
    assert c.layer_scheme("model.layers.0.self_attn.qkv_proj") == c.base
    assert c.layer_scheme("model.layers.1.self_attn.qkv_proj").bits == 8  # "+:" overrides
    assert c.layer_scheme("model.layers.1.mlp.down_proj").group_size == 128


def test_gptqmodel_main_format_keys():
    c = parse(GPTQMODEL_MAIN)
    assert c.base == LayerScheme(8, 32, False, False, ZeroFormat.V2, None)


def test_optimum_modules_in_block_to_quantize():
    c = parse(OPTIMUM)
    assert c.layer_scheme("model.layers.3.self_attn.qkv_proj") == c.base
    assert c.layer_scheme("model.layers.3.mlp.gate_up_proj") == c.base
    assert c.layer_scheme("model.layers.3.self_attn.o_proj") is None
    assert c.layer_scheme("model.layers.3.mlp.down_proj") is None


def test_fused_layer_with_disagreeing_shards_is_refused():
    c = parse({**AUTOGPTQ, "dynamic": {r"+:.*q_proj": {"bits": 8}}})
    with pytest.raises(ValueError, match="qkv_proj fuses checkpoint modules stored differently"):
        c.layer_scheme("model.layers.0.self_attn.qkv_proj")


def test_module_names_match_on_dotted_suffixes():
    assert module_matches("model.layers.0.self_attn.k_proj", "self_attn.k_proj")
    assert module_matches("language_model.model.layers.0.mlp.up_proj", "model.layers.0.mlp.up_proj")
    assert not module_matches("model.layers.0.mlp.gate_proj", "mlp.gate")
    assert not module_matches("model.layers.11.mlp.up_proj", "model.layers.1.mlp.up_proj")


def test_static_groups_and_channelwise_have_no_runtime_act_order():
    assert not parse({**AUTOGPTQ, "static_groups": True}).base.desc_act
    assert not parse({**AUTOGPTQ, "group_size": -1}).base.desc_act


def test_converted_mygptq_config():
    c = parse(quantization_config(Target.MYGPTQ, 4, 128, True, True, layout=Layout.MARLIN))
    assert c.base == LayerScheme(4, 128, True, True, None, Layout.MARLIN)
    c = parse(quantization_config(Target.MYGPTQ, 3, 64, False, False))
    assert c.base.layout is Layout.MARLIN  # the default layout holds every width
    c = parse(quantization_config(Target.MYGPTQ, 3, 64, False, False, layout=Layout.EXLLAMA))
    assert c.base.layout is Layout.EXLLAMA


@pytest.mark.parametrize("layout", [Layout.MARLIN, Layout.EXLLAMA])
def test_converted_dynamic_bits_keep_the_checkpoint_layout(layout):
    cfg = quantization_config(Target.MYGPTQ, 4, 128, True, False, layout=layout,
                              dynamic={r"+:.*down_proj": {"bits": 2}})
    scheme = parse(cfg).layer_scheme("model.layers.0.mlp.down_proj")
    assert scheme.bits == 2 and scheme.layout is layout


# A converted Marlin-layout config as gptq-convert wrote it before the unit_layout key.
CONVERTED_MARLIN = {"quant_method": "mygptq", "checkpoint_format": "mygptq", "layout": "marlin", "bits": 4,
                    "group_size": 128, "sym": True, "desc_act": False}


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_converted_marlin_configs_carry_the_unit_layout(bits):
    cfg = quantization_config(Target.MYGPTQ, bits, 128, True, False)
    assert cfg["unit_layout"] == 2
    check_unit_layout(cfg, "config.json")
    # Without the key: 2/4-bit units and tiles have not changed, so such checkpoints still load.
    if bits != 3:
        check_unit_layout({**CONVERTED_MARLIN, "bits": bits}, "config.json")


@pytest.mark.parametrize("cfg", [
    {**CONVERTED_MARLIN, "bits": 3},
    {**CONVERTED_MARLIN, "dynamic": {r"+:.*down_proj": {"bits": 3}}},  # one module's rule is enough
])
def test_3_bit_units_of_unit_layout_1_are_refused(cfg):
    """3-bit Marlin units as converted before the pair-group layout (no unit_layout); every entry point refuses
    them with this message, the file in front (tests/test_validation.py)."""
    with pytest.raises(ValueError, match=r"^config.json: unit_layout 1 \(3-bit Marlin units .*expected 2; convert "
                                         r"the source checkpoint again with `gptq-convert convert`$"):
        check_unit_layout(cfg, "config.json")
    check_unit_layout({**cfg, "layout": "exllama"}, "config.json")  # ExLlama words have no units


def test_plugin_refuses_3_bit_unit_layout_1_without_a_local_directory(monkeypatch, tmp_path):
    """A model id that is neither a directory nor a cached snapshot skips the file checks (validate.config_sources),
    but not this one: its weights would be served wrong."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    config = MyGPTQConfig.from_config({**CONVERTED_MARLIN, "bits": 3})
    with pytest.raises(ValueError, match=r"^mygptq: quantization config: unit_layout 1 "):
        config.maybe_update_config("nobody/not-cached-3bit")
    MyGPTQConfig.from_config({**CONVERTED_MARLIN, "bits": 3, "unit_layout": 2}).maybe_update_config("nobody/x")


@pytest.mark.parametrize("cfg, message", [
    ({**AUTOGPTQ, "bits": 5}, "bits=5 is not supported"),
    ({**AUTOGPTQ, "group_size": 0}, "group_size=0 is not supported"),
    ({**AUTOGPTQ, "checkpoint_format": "marlin"}, "AutoGPTQ's own Marlin format"),
    ({**AUTOGPTQ, "is_marlin_format": True}, "AutoGPTQ's own Marlin format"),
    ({**AUTOGPTQ, "checkpoint_format": "bitblas"}, "BitBLAS"),
    ({**AUTOGPTQ, "checkpoint_format": "nonsense"}, "unknown checkpoint_format 'nonsense'"),
    ({**AUTOGPTQ, "quant_method": "awq"}, "quant_method 'awq' is not GPTQ"),
    ({**GPTQMODEL_V4, "pack_dtype": "int16"}, "pack_dtype 'int16' is not supported"),
    ({**GPTQMODEL_V4, "dynamic": {"+:(": {}}}, "not a valid regular expression"),
    ({**GPTQMODEL_V4, "dynamic": {r"+:.*": {"format": "gptq"}}}, "changes \\['format'\\]"),
    ({**AUTOGPTQ, "dynamic": {r"+:.*": {"bits": 6}}}, None),  # refused when the layer is resolved
    ({"quant_method": "mygptq", "checkpoint_format": "mygptq", "layout": "bitblas", "bits": 2, "group_size": 128,
      "sym": True, "desc_act": False}, "layout 'bitblas' is not a kernel layout"),
])
def test_unsupported_configs_say_what_and_what_works(cfg, message):
    if message is None:
        with pytest.raises(ValueError, match="bits=6 is not supported"):
            parse(cfg).layer_scheme("model.layers.0.mlp.down_proj")
        return
    with pytest.raises(ValueError, match=message):
        parse(cfg)


@pytest.mark.parametrize("quant_method, user, expected", [
    ("gptq", "mygptq", "mygptq"),  # --quantization mygptq claims a GPTQ checkpoint
    ("gptq", None, None),  # ... and only then: vLLM keeps its own GPTQ path by default
    ("gptq", "gptq", None),
    ("mygptq", None, "mygptq"),  # converted checkpoints always
    ("mygptq", "gptq", "mygptq"),
    ("awq", "mygptq", None),
])
def test_override_quantization_method(quant_method, user, expected):
    assert MyGPTQConfig.override_quantization_method({"quant_method": quant_method}, user) == expected


def test_vllm_model_config_takes_mygptq_for_a_gptq_checkpoint(tmp_path):
    from vllm.config import ModelConfig

    from factory import build_model, write_gptq

    write_gptq(build_model(tmp_path / "float"), tmp_path / "gptq")
    assert ModelConfig(model=str(tmp_path / "gptq"), quantization="mygptq").quantization == "mygptq"
    assert ModelConfig(model=str(tmp_path / "gptq")).quantization != "mygptq"


def test_checkpoint_weight_mapper_keeps_g_idx():
    names = ["model.layers.0.self_attn.q_proj.g_idx", "model.layers.0.self_attn.q_proj.qweight"]
    assert MyGPTQConfig.get_checkpoint_weight_mapper().apply_list(names) == names


def test_checkpoint_weight_mapper_drops_the_g_idx_of_experts_only():
    # vLLM's GPTQ MoE method (experts are delegated to it) has no g_idx; our linear layers need theirs
    keep = ["model.layers.0.self_attn.q_proj.g_idx", "model.layers.0.block_sparse_moe.experts.3.w1.qweight",
            "model.layers.0.mlp.shared_expert.down_proj.g_idx"]
    drop = ["model.layers.0.block_sparse_moe.experts.3.w1.g_idx", "model.layers.1.mlp.experts.10.down_proj.g_idx"]
    assert MyGPTQConfig.get_checkpoint_weight_mapper().apply_list(keep + drop) == keep


def test_moe_layers_take_the_scheme_of_their_listed_experts():
    from gptq_vllm.moe import experts_scheme

    c = parse({**AUTOGPTQ, "desc_act": False, "dynamic": {r"+:.*layers\.1\..*": {"bits": 8}}})
    c.modules_in_block_to_quantize = [f"model.layers.{i}.block_sparse_moe.experts.{e}.{p}"
                                      for i in range(2) for e in range(4) for p in ("w1", "w2", "w3")]
    assert experts_scheme(c, "model.layers.0.block_sparse_moe.experts") == c.base
    assert experts_scheme(c, "model.layers.1.block_sparse_moe.experts") == replace(c.base, bits=8)
    assert experts_scheme(c, "model.layers.2.block_sparse_moe.experts") is None  # not listed: float experts
    c.modules_in_block_to_quantize = ["mlp.experts.0.gate_proj", "self_attn.q_proj"]  # optimum: block-relative
    assert experts_scheme(c, "model.layers.0.mlp.experts") == c.base
    mixed = parse({**AUTOGPTQ, "desc_act": False, "dynamic": {r"+:.*experts\.1\..*": {"bits": 8}}})
    mixed.modules_in_block_to_quantize = [f"model.layers.0.mlp.experts.{e}.down_proj" for e in range(2)]
    with pytest.raises(ValueError, match="experts are stored with different schemes"):
        experts_scheme(mixed, "model.layers.0.mlp.experts")


def test_quantized_modules_are_read_from_the_checkpoint(tmp_path):
    from factory import build_model, write_gptq

    write_gptq(build_model(tmp_path / "float"), tmp_path / "gptq")
    c = parse(AUTOGPTQ)
    c.maybe_update_config(str(tmp_path / "gptq"))
    assert "model.layers.0.self_attn.q_proj" in c.modules_in_block_to_quantize
    assert c.layer_scheme("model.layers.1.mlp.gate_up_proj") == c.base
    assert c.layer_scheme("lm_head") is None


def test_moe_layers_outside_the_in_tree_support_fail_with_what_works():
    from gptq_vllm.moe import get_moe_method, unsupported_reasons

    c = parse({**AUTOGPTQ, "sym": False, "bits": 3})
    assert unsupported_reasons(c, "model.layers.0.mlp.experts") == ["3-bit experts", "asymmetric experts (sym=false)"]
    with pytest.raises(ValueError, match="MoE layer model.layers.0.mlp.experts: .* What works: symmetric 4- or 8-bit"):
        get_moe_method(c, None, "model.layers.0.mlp.experts")
    assert unsupported_reasons(parse(AUTOGPTQ), "model.layers.0.mlp.experts") == []
