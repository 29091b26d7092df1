"""The converter's fast paths produce the same bits as the definitions, and the streaming writer's files read back."""

import json

import pytest
import torch
from safetensors import safe_open

from converters.checkpoint import writer as writer_mod
from converters.checkpoint.writer import CheckpointWriter
from gptq_vllm.formats import bitpack, marlin


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("K, N", [(16, 64), (128, 192), (256, 640)])
@pytest.mark.parametrize("with_perm", [False, True])
def test_marlin_bytewise_pack_equals_tile_map(bits, K, N, with_perm):
    g = torch.Generator().manual_seed(K * N + bits)
    codes = torch.randint(0, 2**bits, (K, N), generator=g, dtype=torch.int32)
    perm = torch.randperm(K, generator=g).to(torch.int32) if with_perm else None
    expected = marlin._pack_tile_map(codes, bits, perm)
    assert torch.equal(marlin.pack(codes, bits, perm), expected)
    assert torch.equal(marlin.pack(codes.to(torch.uint8), bits, perm), expected)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("n", [1, 7, 32, 100])
def test_bitpack_bytewise_equals_general_path(bits, n, monkeypatch):
    g = torch.Generator().manual_seed(bits * 100 + n)
    codes = torch.randint(0, 2**bits, (n, 5), generator=g, dtype=torch.int32)
    fast = bitpack.pack_rows(codes, bits)
    fast_codes = bitpack.unpack_rows(fast, bits, n, dtype=torch.uint8)
    monkeypatch.setattr(bitpack, "_bytewise", lambda b: False)
    assert torch.equal(fast, bitpack.pack_rows(codes, bits))
    assert fast_codes.dtype == torch.uint8
    assert torch.equal(fast_codes, bitpack.unpack_rows(fast, bits, n, dtype=torch.uint8))


def read_dir(d):
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
            assert h.metadata() == {"format": "pt"}
    return out


TENSORS = {
    "a.f16": torch.randn(3, 5).half(), "b.bf16": torch.randn(7).bfloat16(), "c.i32": torch.arange(-9, 9).int(),
    "d.u8": torch.arange(13, dtype=torch.uint8), "e.bool": torch.tensor([True, False]), "f.scalar": torch.tensor(2.5),
    "g.empty": torch.zeros(0, 3), "h.i64": torch.arange(4), "i.f32": torch.randn(2, 2, 2),
}


@pytest.mark.parametrize("reserve", [writer_mod.HEADER_RESERVE, 40])  # 40: every header overflows -> rewrite
@pytest.mark.parametrize("shard_bytes", [2**30, 48])
@pytest.mark.parametrize("background", [False, True])
def test_streaming_writer_round_trip(tmp_path, monkeypatch, reserve, shard_bytes, background):
    monkeypatch.setattr(writer_mod, "HEADER_RESERVE", reserve)
    with CheckpointWriter(tmp_path / "out", max_shard_bytes=shard_bytes, background=background, queue_bytes=64) as w:
        w.add_all(TENSORS)
        w.write_json("config.json", {"x": 1})
        path = w.finish()
    got = read_dir(path)
    assert got.keys() == TENSORS.keys()
    for name, t in TENSORS.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    files = sorted(p.name for p in path.glob("*.safetensors"))
    if shard_bytes == 48:
        index = json.loads((path / "model.safetensors.index.json").read_text())
        assert sorted(set(index["weight_map"].values())) == files and len(files) > 2
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in TENSORS.values())
    else:
        assert files == ["model.safetensors"]
    assert not list(tmp_path.glob(".out.tmp-*"))


@pytest.mark.parametrize("background", [False, True])
def test_writer_failure_leaves_nothing(tmp_path, background):
    with pytest.raises(RuntimeError):
        with CheckpointWriter(tmp_path / "out", background=background) as w:
            w.add("x", torch.ones(3))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_background_write_error_surfaces(tmp_path):
    with pytest.raises(ValueError, match="cannot be stored in safetensors"):
        with CheckpointWriter(tmp_path / "out", background=True) as w:
            w.add("bad", torch.ones(2, dtype=torch.complex64))
            w.finish()
    assert list(tmp_path.iterdir()) == []
