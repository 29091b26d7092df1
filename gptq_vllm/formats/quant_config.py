"""A checkpoint's quantization config, parsed once: the plugin (config.py) and the converter's readers both
call `parse`, so they accept the same configs, read them the same way and word refusals alike.

Dialects (formats.md §2, §6): AutoGPTQ `quantize_config.json` (w_bit/q_group_size synonyms, is_marlin_format),
GPTQModel (`format`/`method`, `dynamic`, `pack_dtype`, `meta`), transformers/optimum `quantization_config`
(`modules_in_block_to_quantize`, `checkpoint_format`), TheBloke files, compressed-tensors pack-quantized
(llm-compressor), and our converted format (`quant_method: mygptq`).

GPTQModel `dynamic` holds per-module rules keyed by regex, taken in file order, first match wins (re.match
on the full module name, as GPTQModel and vLLM's get_dynamic_override do):
    "+:<re>" or "<re>": {"bits": 8, "desc_act": true, ...}   modules matching <re> use these values
    "-:<re>": {}                                             modules matching <re> are not quantized
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from . import compressed_tensors, marlin
from .bitpack import SUPPORTED_BITS
from .errors import FormatError
from .gptq import ZeroFormat
from .kernel_layout import Layout

SYNONYMS = {"w_bit": "bits", "q_group_size": "group_size", "format": "checkpoint_format", "method": "quant_method"}
# What a missing key means; config files that mean different things are refused (validate.config_sources).
DEFAULTS = {"quant_method": "gptq", "checkpoint_format": "gptq", "group_size": -1, "sym": True, "desc_act": False,
            "static_groups": False, "pack_dtype": "int32", "lm_head": False, "dynamic": {}}
# Keys a `dynamic` rule may set per module.  GPTQModel rules also carry quantizer knobs (damp_percent, mse,
# hessian, ...) that do not change the stored tensors: ignored.  Keys that change the tensor format are refused.
OVERRIDABLE = ("bits", "group_size", "sym", "desc_act", "static_groups")
FORMAT_KEYS = ("format", "checkpoint_format", "quant_method", "method", "pack_dtype")
# checkpoint_format values naming a tensor layout no reader here takes, with what to do instead.
FOREIGN_FORMATS = {
    "marlin": "AutoGPTQ's own Marlin format (tensors B/s) is not read here; use the original GPTQ checkpoint",
    "bitblas": "GPTQModel's BitBLAS format is not supported; use the gptq/gptq_v2 export of the model",
    "gptq_p": "GPTQModel's planar 5/6/7-bit format is not supported; quantize to 2, 3, 4 or 8 bits",
    "gemm": "AWQ checkpoints (format 'gemm') are not GPTQ; serve them with vLLM's awq method",
    "gemv": "AWQ checkpoints (format 'gemv') are not GPTQ; serve them with vLLM's awq method",
}


def normalize(cfg: dict) -> dict:
    """Synonyms under their canonical names; pack_dtype without its "torch." prefix."""
    out = dict(cfg)
    for old, new in SYNONYMS.items():
        if old in out and new not in out:
            out[new] = out.pop(old)
    if out.get("pack_dtype") is not None:
        out["pack_dtype"] = str(out["pack_dtype"]).removeprefix("torch.")
    return out


def value(cfg: dict, key: str):
    """A normalized config's value for `key`, its default when missing or null."""
    v = cfg.get(key)
    return DEFAULTS.get(key) if v is None else v


@dataclass(frozen=True)
class ModuleParams:
    """How one module is quantized.  desc_act: act-order declared, so its g_idx must be present (never with
    static groups, whose g_idx is k // G, nor with group_size -1, one group)."""

    bits: int
    group_size: int
    sym: bool
    desc_act: bool = False


def module_params(values: dict, where: str) -> ModuleParams:
    bits, group_size = values.get("bits"), value(values, "group_size")
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise FormatError(f"{where}: bits={bits!r} is not supported; GPTQ checkpoints with bits in "
                          f"{SUPPORTED_BITS} are")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or not (group_size == -1 or group_size > 0):
        raise FormatError(f"{where}: group_size={group_size!r} is not supported; use -1 (one group per output "
                          f"channel) or a positive group size")
    desc_act = bool(value(values, "desc_act")) and not bool(value(values, "static_groups")) and group_size != -1
    return ModuleParams(bits, group_size, bool(value(values, "sym")), desc_act)


@dataclass(frozen=True)
class Rule:
    pattern: str  # as written, with its +:/-: prefix
    regex: re.Pattern
    skip: bool
    overrides: dict  # the OVERRIDABLE keys it sets


def dynamic_rules(dynamic: dict | None, where: str) -> tuple[Rule, ...]:
    rules = []
    for pattern, overrides in (dynamic or {}).items():
        skip = pattern.startswith("-:")
        try:
            regex = re.compile(pattern[2:] if pattern.startswith(("-:", "+:")) else pattern)
        except re.error as e:
            raise FormatError(f"{where}: dynamic rule {pattern!r} is not a valid regular expression ({e})") from None
        overrides = dict(overrides or {})
        changed = [k for k in FORMAT_KEYS if k in overrides and (k != "pack_dtype" or normalize(overrides)[k] != "int32")]
        if changed and not skip:
            raise FormatError(f"{where}: dynamic rule {pattern!r} changes {changed} for some modules; one tensor "
                              f"format per checkpoint is read, with per-module {list(OVERRIDABLE)}")
        values = normalize(overrides)
        rules.append(Rule(pattern, regex, skip, {k: values[k] for k in OVERRIDABLE if k in values}))
    return tuple(rules)


@dataclass(frozen=True)
class QuantScheme:
    """A parsed quantization config: the base parameters, the per-module rules and the tensor format."""

    method: str  # "gptq", "compressed-tensors" or "mygptq"
    base: ModuleParams
    zero_format: ZeroFormat | None  # gptq: the declared v1/v2 zero convention
    layout: Layout | None  # mygptq: the kernel layout of every module of the checkpoint
    compressed: bool  # compressed-tensors pack-quantized tensors
    lm_head: bool
    rules: tuple[Rule, ...]
    where: str  # the config, for messages
    raw: dict  # the config as read
    base_values: dict = field(default_factory=dict)  # OVERRIDABLE values the rules apply over
    ignore: list[str] = field(default_factory=list)  # compressed-tensors modules left unquantized
    modules_in_block_to_quantize: list[str] = field(default_factory=list)  # optimum

    @property
    def dynamic(self) -> dict:
        return dict(self.raw.get("dynamic") or {})

    def rule(self, module: str) -> Rule | None:
        return next((r for r in self.rules if r.regex.match(module)), None)

    def params(self, module: str) -> ModuleParams | None:
        """Parameters of one module (full checkpoint name); None when a "-:" rule leaves it unquantized."""
        rule = self.rule(module)
        if rule is None:
            return self.base
        if rule.skip:
            return None
        return module_params({**self.base_values, **rule.overrides},
                             f"{self.where}: dynamic rule {rule.pattern!r} for {module}")


def _flatten(items) -> list[str]:
    out: list[str] = []
    for item in items or []:
        out.extend(_flatten(item) if isinstance(item, (list, tuple)) else [str(item)])
    return out


def parse(config: dict, where: str) -> QuantScheme:
    """The quantization config `config` (as found in the checkpoint); FormatError "{where}: ..." otherwise."""
    if str(config.get("quant_method") or config.get("method")).lower() == "compressed-tensors":
        return _compressed_tensors(config, where)  # its own keys: `format` is "pack-quantized", not a synonym
    cfg = normalize(config)
    method = str(value(cfg, "quant_method")).lower()
    fmt = str(value(cfg, "checkpoint_format")).lower()
    if cfg.get("is_marlin_format") or method == "marlin":
        fmt = "marlin"
    if fmt in FOREIGN_FORMATS:
        raise FormatError(f"{where}: checkpoint_format {fmt!r}: {FOREIGN_FORMATS[fmt]}")
    if method not in ("gptq", "mygptq"):
        raise FormatError(f"{where}: quant_method {method!r} is not GPTQ; supported are GPTQ checkpoints (quant_method "
                          f"'gptq'), compressed-tensors pack-quantized ones and their `gptq-convert` conversions "
                          f"(quant_method 'mygptq')")
    if value(cfg, "pack_dtype") != "int32":
        raise FormatError(f"{where}: pack_dtype {cfg['pack_dtype']!r} is not supported: vLLM and the kernel layouts "
                          f"read int32 words; re-export the checkpoint with GPTQModel pack_dtype=int32")
    if cfg.get("bits") is None:
        raise FormatError(f"{where}: the quantization config has no 'bits'")
    base_values = {k: cfg[k] for k in OVERRIDABLE if k in cfg}
    base = module_params(base_values, where)
    layout = zero_format = None
    if method == "mygptq" or fmt == "mygptq":
        try:
            layout = Layout(str(cfg.get("layout")).lower())
        except ValueError:
            raise FormatError(f"{where}: layout {cfg.get('layout')!r} is not a kernel layout; converted checkpoints "
                              f"have one of {[m.value for m in Layout]}") from None
        method = "mygptq"
    else:
        try:
            zero_format = ZeroFormat.parse(fmt)
        except FormatError as e:
            raise FormatError(f"{where}: {e}") from None
    return QuantScheme(method=method, base=base, zero_format=zero_format, layout=layout, compressed=False,
                       lm_head=bool(value(cfg, "lm_head")), rules=dynamic_rules(cfg.get("dynamic"), where),
                       where=where, raw=cfg, base_values=base_values,
                       modules_in_block_to_quantize=_flatten(cfg.get("modules_in_block_to_quantize")))


def check_unit_layout(config: dict, where: str) -> None:
    """A converted Marlin-layout checkpoint's 3-bit weights must be in the unit layout the kernels read
    (marlin.UNIT_LAYOUT); layout 1 (no key) is refused.  Called where the config file is known
    (validate.config_sources), so that every entry point names it alike."""
    cfg = normalize(config)
    if str(value(cfg, "quant_method")).lower() != "mygptq" or str(cfg.get("layout")).lower() != Layout.MARLIN.value:
        return
    bits = {cfg.get("bits")} | {r.overrides.get("bits") for r in dynamic_rules(cfg.get("dynamic"), where) if not r.skip}
    version = cfg.get("unit_layout", 1)
    if 3 in bits and version != marlin.UNIT_LAYOUT:
        raise FormatError(f"{where}: unit_layout {version} (3-bit Marlin units as gptq-convert wrote them before "
                          f"2026-12-07), expected {marlin.UNIT_LAYOUT}; convert the source checkpoint again with "
                          f"`gptq-convert convert`")


def _compressed_tensors(cfg: dict, where: str) -> QuantScheme:
    bits, group_size, sym, act_order = compressed_tensors.scheme(cfg, where)
    if bits not in compressed_tensors.CT_BITS:
        raise FormatError(f"{where}: compressed-tensors {bits}-bit weights are not read here (only "
                          f"{compressed_tensors.CT_BITS}-bit); serve them with vLLM's compressed-tensors method")
    values = {"bits": bits, "group_size": group_size, "sym": sym, "desc_act": act_order}
    return QuantScheme(method="compressed-tensors", base=module_params(values, where), zero_format=None, layout=None,
                       compressed=True, lm_head=False, rules=(), where=where, raw=dict(cfg), base_values=values,
                       ignore=list(cfg.get("ignore") or []))
