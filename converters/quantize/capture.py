"""The model streamed from safetensors: a parameter-less transformers shell, one layer at a time.

The HF model class is built with every parameter on the meta device (buffers such as RoPE frequencies
are real: they are computed, not stored).  Parameters are read from the checkpoint when a piece of the
model is needed and dropped back to meta after, so only the layer in flight is ever materialized.

Layer inputs and keyword arguments are captured with the model's own forward, run with every decoder
layer's forward replaced by a recorder: whatever the model computes per layer (the causal or sliding
window mask, the RoPE tuple, position ids) is what each layer is later called with, so hybrid models
(Gemma 2/3 sliding and global layers) get the right kwargs without per-model code.  The last recorder
stops the forward, so the final norm and the LM head never run.

Tensor names: a parameter is read under its own name or its Hub spelling (moe_names.stored_name), and
fused MoE expert parameters are assembled from the per-expert weights transformers 5 saves.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .moe import fused_experts
from .moe_names import ExpertNames, resolve, stored_name


class StopForward(Exception):
    """Raised by a hook to end a forward early (the rest of the model is not needed)."""


@contextmanager
def params_on_meta() -> Iterator[None]:
    original = nn.Module.register_parameter

    def register(module, name, param):
        if param is not None:
            param = nn.Parameter(param.to("meta"), requires_grad=False)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, list) of the model's decoder layers: its ModuleList of num_hidden_layers entries."""
    n = model.config.get_text_config().num_hidden_layers
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n:
            return name, mod
    raise ValueError(f"{type(model).__name__}: no list of {n} decoder layers found")


class Checkpoint:
    """Per-tensor reads of a safetensors model directory; files are opened per read, so the memory map
    of tensors already consumed does not stay resident (host RSS stays at about one layer)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            self.where = {k: self.path / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"{self.path}: no .safetensors files")
            self.where = {}
            for f in files:
                with safe_open(str(f), framework="pt") as h:
                    self.where.update(dict.fromkeys(h.keys(), f))

    def names(self) -> list[str]:
        return list(self.where)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, from the file headers (each file opened once)."""
        out = {}
        for f in sorted(set(self.where.values())):
            with safe_open(str(f), framework="pt") as h:
                out.update({n: tuple(h.get_slice(n).get_shape()) for n in h.keys() if self.where.get(n) == f})
        return out

    def read(self, names: list[str], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        missing = [n for n in names if n not in self.where]
        if missing:
            raise KeyError(f"{self.path}: tensors missing from the checkpoint: {missing[:5]}"
                           f"{' ...' if len(missing) > 5 else ''} (a model whose checkpoint names differ from "
                           f"its transformers modules is not supported)")
        out = {}
        for f in sorted({self.where[n] for n in names}):
            with safe_open(str(f), framework="pt", device=str(device)) as h:
                out.update({n: h.get_tensor(n) for n in names if self.where[n] == f})
        return out


class ModelShell:
    def __init__(self, model_dir: str | Path, device: torch.device, dtype: torch.dtype | None = None):
        """dtype: of the forwards; None is the checkpoint's on CUDA and float32 on CPU (half-precision
        matmuls on CPU are slow and do not compute what a GPU computes)."""
        import transformers
        from transformers.initialization import no_init_weights

        self.dir = Path(model_dir)
        self.config = transformers.AutoConfig.from_pretrained(self.dir)
        self.config._attn_implementation = "sdpa"
        if dtype is None:
            stored = getattr(self.config.get_text_config(), "dtype", None) or torch.float16
            stored = getattr(torch, stored) if isinstance(stored, str) else stored
            dtype = torch.float32 if device.type == "cpu" else stored
        self.device, self.dtype = device, dtype
        self.ckpt = Checkpoint(self.dir)
        with no_init_weights(), params_on_meta():
            self.model = transformers.AutoModelForCausalLM.from_config(self.config, dtype=dtype)
        self.model.eval()
        self.layers_name, self.layers = decoder_layers(self.model)
        names = set(self.ckpt.names())
        self.experts: dict[str, ExpertNames] = {}  # full module name -> where the checkpoint stores its experts
        for i, layer in enumerate(self.layers):
            for n in fused_experts(layer):
                module = f"{self.layer_prefix(i)}.{n}"
                self.experts[module] = resolve(module, names, self.config.model_type)
        for name, buf in list(self.model.named_buffers()):
            if not name.startswith(self.layers_name + "."):
                self._set(name, buf.to(device), buffer=True)

    @property
    def base(self) -> nn.Module:
        return self.model.base_model

    def layer_prefix(self, i: int) -> str:
        return f"{self.layers_name}.{i}"

    def _set(self, name: str, tensor: torch.Tensor, buffer: bool = False) -> None:
        owner, _, leaf = name.rpartition(".")
        mod = self.model.get_submodule(owner)
        if buffer:
            mod._buffers[leaf] = tensor
        else:
            mod._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)

    def _load(self, names: list[str]) -> None:
        known = set(self.ckpt.names())
        per_expert = {}  # fused expert parameter -> (its ExpertNames, number of experts)
        for name in names:
            experts = self.experts.get(name.rpartition(".")[0])
            if experts is not None and not experts.fused:
                per_expert[name] = (experts, self.model.get_parameter(name).shape[0])
        plain = {n: stored_name(n, known) or n for n in names if n not in per_expert}  # absent: read says why
        wanted = set(plain.values())
        for name, (experts, num) in per_expert.items():
            wanted.update(experts.sources(name.rpartition(".")[2], num))
        tensors = self.ckpt.read(sorted(wanted), self.device)
        for name, src in plain.items():
            self._set(name, tensors[src].to(self.dtype))
        for name, (experts, num) in per_expert.items():
            t = experts.assemble(name.rpartition(".")[2], num, lambda m: tensors[f"{m}.weight"])
            self._set(name, t.to(self.dtype))

    def _unload(self, names: list[str]) -> None:
        for name in names:
            p = self.model.get_parameter(name)
            self._set(name, torch.empty_like(p, device="meta"))

    def outer_names(self) -> list[str]:
        """Parameters outside the decoder layers and the LM head (embeddings, final norm)."""
        head = {n for n, _ in self.model.get_output_embeddings().named_parameters(prefix="lm_head")}
        return [n for n, _ in self.model.named_parameters()
                if not n.startswith(self.layers_name + ".") and n not in head]

    @contextmanager
    def outer(self) -> Iterator[None]:
        names = self.outer_names()
        self._load(names)
        try:
            yield
        finally:
            self._unload(names)

    def load_layer(self, i: int) -> nn.Module:
        prefix = self.layer_prefix(i)
        self._load([f"{prefix}.{n}" for n, _ in self.layers[i].named_parameters()])
        return self.layers[i]

    def unload_layer(self, i: int) -> None:
        self.layers[i].to("meta")

    @contextmanager
    def layer_forwards(self, make: Callable[[int], Callable]) -> Iterator[None]:
        """Replace each decoder layer's forward by make(i) (attributes such as attention_type stay)."""
        for i, layer in enumerate(self.layers):
            layer.forward = make(i)
        try:
            yield
        finally:
            for layer in self.layers:
                del layer.forward

    def capture(self, batches: list[torch.Tensor]) -> tuple[list[torch.Tensor], dict[int, list[dict]]]:
        """Layer-0 inputs per batch, and each layer's (args, kwargs) per batch size."""
        inputs: list[torch.Tensor] = []
        kwargs: dict[int, list[dict]] = {}
        last = len(self.layers) - 1

        def make(i):
            def record(hidden_states, *args, **kw):
                if i == 0:
                    inputs.append(hidden_states)
                calls = kwargs.setdefault(hidden_states.shape[0], [None] * len(self.layers))
                if calls[i] is None:
                    calls[i] = {"args": args, "kwargs": kw}
                if i == last:
                    raise StopForward
                return hidden_states
            return record

        with self.outer(), self.layer_forwards(make), torch.no_grad():
            for ids in batches:
                try:
                    self.base(input_ids=ids.to(self.device), use_cache=False)
                except StopForward:
                    pass
        return inputs, kwargs

    def final_hidden(self, outputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """What the LM head reads (after the final norm) given the last layer's outputs per batch."""
        last = len(self.layers) - 1
        current: dict[str, torch.Tensor] = {}

        def make(i):
            return (lambda h, *a, **k: current["out"]) if i == last else (lambda h, *a, **k: h)

        results = []
        with self.outer(), self.layer_forwards(make), torch.no_grad():
            for out in outputs:
                current["out"] = out
                ids = torch.zeros(out.shape[:2], dtype=torch.long, device=self.device)
                results.append(self.base(input_ids=ids, use_cache=False).last_hidden_state)
        return results
