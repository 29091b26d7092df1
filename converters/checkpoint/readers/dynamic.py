"""GPTQModel `dynamic`: per-module overrides of the quantization parameters, keyed by regex.

    "+:<re>" or "<re>": {"bits": 8, "group_size": 64, ...}   modules matching <re> use these values
    "-:<re>": {}                                             modules matching <re> are not quantized

A module takes the first rule (in file order) whose regex matches the start of its full name (re.match),
the semantics of GPTQModel and of vLLM's get_dynamic_override (formats.md §2.2).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from gptq_vllm.formats.errors import FormatError

OVERRIDABLE = ("bits", "group_size", "sym", "desc_act")


@dataclass(frozen=True)
class ModuleParams:
    """Quantization parameters of one module."""

    bits: int
    group_size: int
    sym: bool


@dataclass(frozen=True)
class Rule:
    pattern: str  # as written in the config, with its +:/-: prefix
    regex: re.Pattern
    skip: bool
    overrides: dict


class DynamicRules:
    def __init__(self, dynamic: dict | None, where: str):
        self.raw = dict(dynamic or {})
        self.rules: list[Rule] = []
        for pattern, overrides in self.raw.items():
            skip = pattern.startswith("-:")
            body = pattern[2:] if pattern.startswith(("-:", "+:")) else pattern
            try:
                regex = re.compile(body)
            except re.error as e:
                raise FormatError(f"{where}: dynamic rule {pattern!r} is not a valid regex ({e})") from e
            overrides = dict(overrides or {})
            unknown = sorted(set(overrides) - set(OVERRIDABLE))
            if unknown and not skip:
                raise FormatError(f"{where}: dynamic rule {pattern!r} overrides {unknown}; only {list(OVERRIDABLE)} are supported")
            self.rules.append(Rule(pattern, regex, skip, overrides))

    def __bool__(self) -> bool:
        return bool(self.rules)

    def match(self, module: str) -> Rule | None:
        for rule in self.rules:
            if rule.regex.match(module):
                return rule
        return None

    def params(self, module: str, base: ModuleParams) -> ModuleParams | None:
        """The parameters of `module`, or None when a "-:" rule leaves it unquantized."""
        rule = self.match(module)
        if rule is None:
            return base
        if rule.skip:
            return None
        o = rule.overrides
        return replace(base, **{k: type(getattr(base, k))(o[k]) for k in ("bits", "group_size", "sym") if k in o})
