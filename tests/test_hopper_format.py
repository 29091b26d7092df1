"""The Hopper GEMM's operands (formats.hopper) and its per-call selection, on the CPU.

The GPU side (the CuTe atom's offsets against tile_offsets, the GEMM against the reference) is in
tests/gpu/test_kernels.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re

import pytest
import torch

from gptq_vllm.formats import act_order, hopper, marlin
from gptq_vllm.formats.gptq import QuantizedWeight
from gptq_vllm.formats.kernel_layout import Layout, to_kernel
from gptq_vllm.kernels import selection

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def pick():
    """benchmarks/pick_hopper.py as a module."""
    spec = importlib.util.spec_from_file_location("pick_hopper", os.path.join(ROOT, "benchmarks", "pick_hopper.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def weight(bits, group_size, sym, K=256, N=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    ng = act_order.num_groups(K, group_size)
    codes = torch.randint(0, 2**bits, (K, N), generator=g, dtype=torch.int32)
    zeros = (torch.full((ng, N), 2 ** (bits - 1), dtype=torch.int32) if sym
             else torch.randint(0, 2**bits, (ng, N), generator=g, dtype=torch.int32))
    scales = (torch.rand(ng, N, generator=g) * 0.02 + 1e-3).half().float()
    return QuantizedWeight(codes, scales, zeros, act_order.default_g_idx(K, group_size), bits, group_size, sym)


@pytest.mark.parametrize("bits", [4, 8])
def test_tile_offsets_follow_the_marlin_tile_map(bits):
    off = hopper.tile_offsets(bits)
    assert off.shape == (64, 16)
    assert torch.equal(off.flatten().sort().values, torch.arange(1024))  # a bijection onto the tile's codes
    # Unpacking a packed tile through the offsets gives back every code at its (k, n).
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (16, 64), generator=g, dtype=torch.int32)
    words = marlin.pack(codes, bits).flatten()
    per_word = 32 // bits
    for n in range(64):
        for k in range(16):
            o = int(off[n, k])
            field = (int(words[o // per_word]) >> (bits * (o % per_word))) & (2**bits - 1)
            assert field == int(codes[k, n]), (n, k)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [-1, 64, 128])
@pytest.mark.parametrize("sym", [True, False])
def test_operands_dequantize_like_the_reference(bits, group_size, sym):
    w = weight(bits, group_size, sym)
    kw = to_kernel(w, Layout.MARLIN, scale_dtype=torch.float16)
    rows = marlin.stored_rows(kw.qweight, bits)
    ops = hopper.operands(kw.qzeros, kw.scales, bits=bits, group_size=group_size, in_rows=rows)
    # Plain scales: the checkpoint's scales again (Marlin's permutation undone).
    assert torch.equal(ops.scales.float(), w.scales)
    assert (ops.zeros is None) == sym
    # What the kernel computes: s * (q - 2^(b-1)) [+ zero term], against s * (q - z).
    g = w.g_idx.long()
    deq = ops.scales.float()[g] * (w.codes - 2 ** (bits - 1))
    if not sym:
        assert ops.zeros.dtype == torch.float16
        deq = deq + ops.zeros.float()[g]
    want = w.scales[g] * (w.codes - w.zeros[g])
    # The zero term is rounded to fp16 once: at most half an ulp of s * |2^(b-1) - z|.
    tol = 0 if sym else (w.scales[g] * (2 ** (bits - 1) - w.zeros[g]).abs() * 2.0**-11)
    assert ((deq - want).abs() <= tol).all()


def test_unsupported_names_the_reason():
    assert hopper.unsupported(bits=4, group_size=128, in_rows=4096, g_idx_sorted=False) is None
    assert hopper.unsupported(bits=8, group_size=-1, in_rows=4096, g_idx_sorted=False) is None
    assert hopper.unsupported(bits=4, group_size=4096, in_rows=4096, g_idx_sorted=False) is None  # one group
    assert "group size 32" in hopper.unsupported(bits=4, group_size=32, in_rows=4096, g_idx_sorted=False)
    assert "act-order shard" in hopper.unsupported(bits=4, group_size=128, in_rows=4096, g_idx_sorted=True)
    assert hopper.unsupported(bits=3, group_size=128, in_rows=4096, g_idx_sorted=False) is None  # the unit mainloop
    assert hopper.unsupported(bits=2, group_size=-1, in_rows=4096, g_idx_sorted=False) is None
    assert "group size 32" in hopper.unsupported(bits=3, group_size=32, in_rows=4096, g_idx_sorted=False)
    assert "5-bit" in hopper.unsupported(bits=5, group_size=128, in_rows=4096, g_idx_sorted=False)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("sym", [True, False])
def test_2_3_4_bit_marlin_layers_get_hopper_operands(bits, sym, monkeypatch):
    """On an sm_90 GPU every Marlin-layout width gets the Hopper operands, plain scales and, for zero points, the
    term s (2^(b-1) - z) of the layer's own width, with which both mainloops compute
    s (q - 2^(b-1)) + s (2^(b-1) - z) = s (q - z)."""
    pytest.importorskip("vllm")
    from gptq_vllm.config import LayerScheme
    from gptq_vllm.linear import MyGPTQLinearMethod

    monkeypatch.setattr(selection, "hopper_available", lambda device: True)
    method = MyGPTQLinearMethod(LayerScheme(bits, 128, sym, False, None, None), "model.layers.0.mlp.down_proj")
    w = weight(bits, 128, sym)
    kw = to_kernel(w, Layout.MARLIN, scale_dtype=torch.float32)
    ops = method._hopper_operands(kw)
    assert ops is not None and (ops.zeros is None) == sym
    g = w.g_idx.long()
    zero_term = 0 if sym else ops.zeros.float()[g]
    kernel_weight = ops.scales.float()[g] * (w.codes - 2 ** (bits - 1)) + zero_term
    assert torch.allclose(kernel_weight, w.scales[g] * (w.codes - w.zeros[g]), rtol=1e-6, atol=1e-6)


def test_hopper_choice_by_batch_size(monkeypatch):
    names = ["128x16_c1", "128x32_c2", "128x64_c2", "128x128_c2", "128x256_c2"]
    monkeypatch.setattr(selection, "_config_ids", {n: i for i, n in enumerate(names)})
    default = {16: None, 32: ("128x32_c2", 0, 1), 64: ("128x64_c2", 3, 1), 128: ("128x128_c2", 2, 2),
               256: ("128x256_c2", 0, 1), 512: ("128x256_c2", 0, 1), 1024: ("128x256_c2", 0, 1),
               2048: ("128x256_c2", 0, 1), 8192: ("128x256_c2", 3, 1)}
    assert set(default) == set(selection.HOPPER_BUCKETS)
    monkeypatch.setattr(selection, "HOPPER_DEFAULT", default)
    monkeypatch.setattr(selection, "HOPPER_TUNED", {(4096, 4096): {16: ("128x16_c1", 3, 1), 32: None,
                                                                   64: ("128x16_c1", 3, 1)}})
    # Decode sizes stay on the Marlin kernels by default.
    assert selection.hopper_choice(1, 8192, 8192) is None
    assert selection.hopper_choice(16, 8192, 8192) is None
    # Buckets are upper bounds; M past the last bucket uses the last.
    assert selection.hopper_choice(17, 8192, 8192) == (1, 0, 1)
    assert selection.hopper_choice(100, 8192, 8192) == (3, 2, 2)
    assert selection.hopper_choice(2048, 8192, 8192) == (4, 0, 1)
    assert selection.hopper_choice(2049, 8192, 8192) == (4, 3, 1)
    assert selection.hopper_choice(100000, 8192, 8192) == (4, 3, 1)
    # A tuned shape: its own rows, the default row for buckets it does not list.
    assert selection.hopper_choice(32, 4096, 4096) is None
    assert selection.hopper_choice(64, 4096, 4096) == (0, 3, 1)
    assert selection.hopper_choice(128, 4096, 4096) == (3, 2, 2)
    # Below HOPPER_MIN_M the Marlin kernels' 8-row tiles run even where the 16-row bucket picks Hopper.
    assert selection.hopper_choice(selection.HOPPER_MIN_M - 1, 4096, 4096) is None
    assert selection.hopper_choice(selection.HOPPER_MIN_M, 4096, 4096) == (0, 3, 1)
    # 2/3-bit layers take the same choices from UNITS_MIN_M on: on their units where the config's tile features
    # divide N (the unit mainloop copies whole tiles), else the Marlin kernels; from WIDEN_MIN_M on a 4-bit copy,
    # which any N fits.
    assert selection.hopper_choice(selection.UNITS_MIN_M - 1, 8192, 8192, bits=3) is None
    assert selection.hopper_choice(100, 8192, 8192, bits=3) == (3, 2, 2)
    assert selection.hopper_choice(100, 8192, 8192 + 64, bits=2) is None
    assert selection.hopper_choice(100, 8192, 8192 + 64, bits=4) == (3, 2, 2)
    widen = selection.WIDEN_MIN_M[3]
    assert selection.hopper_choice(widen, 8192, 8192 + 64, bits=3) == \
        selection.hopper_choice(widen, 8192, 8192 + 64, bits=4) is not None
    assert selection.widened(widen, 3) and not selection.widened(widen - 1, 3)
    assert not selection.widened(100000, 2) and not selection.widened(100000, 4)
    assert selection.tile_features("64x256_c2_pp") == 64 and selection.tile_features("256x16_c1") == 256


def test_units_take_their_width_s_own_choices_where_tabled(monkeypatch):
    """HOPPER_UNITS_TUNED overrides the shared table for one width's units only: not for other widths, not for a
    widened call (a 4-bit copy runs the 4-bit choice), not where the shared table keeps the Marlin kernels."""
    names = ["128x64_c2", "128x128_c2", "256x64_c2"]
    monkeypatch.setattr(selection, "_config_ids", {n: i for i, n in enumerate(names)})
    monkeypatch.setattr(selection, "HOPPER_TUNED", {(8192, 8192): {64: ("128x64_c2", 2, 2), 128: ("128x128_c2", 3, 1),
                                                                   2048: ("128x128_c2", 0, 1)},
                                                    (4096, 4096): {64: None}})
    monkeypatch.setattr(selection, "HOPPER_UNITS_TUNED", {3: {(8192, 8192): {64: ("256x64_c2", 0, 1),
                                                                             2048: ("256x64_c2", 3, 1)},
                                                              (4096, 4096): {64: ("256x64_c2", 0, 1)}}})
    assert selection.hopper_choice(64, 8192, 8192, bits=3) == (2, 0, 1)
    assert selection.hopper_choice(64, 8192, 8192, bits=2) == selection.hopper_choice(64, 8192, 8192) == (0, 2, 2)
    assert selection.hopper_choice(128, 8192, 8192, bits=3) == (1, 3, 1)  # a bucket the width does not list
    assert selection.hopper_choice(64, 4096, 4096, bits=3) is None
    assert selection.widened(2048, 3) and selection.hopper_choice(2048, 8192, 8192, bits=3) == (1, 0, 1)
    assert selection.table_choice(2048, 8192, 8192, 3) == ("256x64_c2", 3, 1)  # bounds aside, as kernels.py times it


def test_every_tabled_choice_names_a_known_config_and_decomposition():
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc", "hopper", "configs.h")
    with open(path) as f:
        configs = {f"{w}x{t}_c{c}" + ("_pp" if s == "pp" else "")
                   for w, t, c, s in re.findall(r"X\(\d+, (\d+), (\d+), (\d+), (coop|pp)\)", f.read())}
    assert len(configs) >= 12 and any(c.endswith(selection.PINGPONG_SUFFIX) for c in configs)
    rows = [selection.HOPPER_DEFAULT, *selection.HOPPER_TUNED.values(),
            *(row for table in selection.HOPPER_UNITS_TUNED.values() for row in table.values())]
    assert set(selection.HOPPER_UNITS_TUNED) <= set(hopper.UNIT_BITS)
    for row in rows:
        for choice in row.values():
            if choice is not None:
                name, decomposition, splits = choice
                assert name in configs and decomposition in (0, 1, 2, 3) and splits >= 1
                assert selection.hopper_decompositions(name, ((decomposition, splits),)), choice
    assert set(selection.HOPPER_DEFAULT) == set(selection.HOPPER_BUCKETS)


def test_pingpong_configs_run_data_parallel_only():
    every = ((0, 1), (1, 1), (2, 2), (3, 1))
    assert selection.hopper_decompositions("128x128_c2", every) == every
    assert selection.hopper_decompositions("64x128_c2" + selection.PINGPONG_SUFFIX, every) == ((0, 1), (1, 1))


def test_pick_hopper_writes_the_tables_it_picks(pick, tmp_path, monkeypatch, capsys):
    """benchmarks/pick_hopper.py --write: per shape and bucket the fastest Hopper choice that beats the Marlin path
    by >= 5 % (above M = 128, where the Marlin path is dense, one that the dense mode does not beat by >= 5 %), put
    into selection.py in place of the old tables, the rest of the file unchanged; several sweeps (as the TP-1 shapes
    and TP=2 shards are swept) make one table, a point timed again taking the later run's timings."""
    sweeps = []
    for shape, (k, n) in {"a": (4096, 4096), "b": (8192, 8192)}.items():
        rows = []
        for m in selection.HOPPER_BUCKETS:
            fast = m >= 64  # the Hopper GEMM wins from M = 64 on
            times = {"cublas_fp16": 10.0, "marlin": 10.0, "128x64_c2/3/1": 7.0 if fast else 9.8,
                     "64x128_c2_pp/0/1": 6.0 if fast and shape == "b" else 12.0}
            if m == selection.HOPPER_BUCKETS[-1]:  # dense Marlin path: a 3 % lead keeps Hopper (a), 9 % does not (b)
                times.update({"128x64_c2/3/1": 10.3 if shape == "a" else 10.9, "64x128_c2_pp/0/1": 12.0})
            rows += [dict(shape=shape, K=k, N=n, M=m, bits=4, kernel=kern, us=us) for kern, us in times.items()]
        sweeps.append(tmp_path / f"hopper-sweep-{shape}.json")
        sweeps[-1].write_text(json.dumps(dict(meta={}, rows=rows)))
    # A later sweep timing one point again (a new config) replaces that point whole: the earlier run's faster
    # 128x64_c2 is not mixed into it.  A ping-pong config's two timings are one kernel's: the slower one counts
    # (7.0, not 6.0, so 256x32_c2 wins at 6.5).
    again = {"cublas_fp16": 10.0, "marlin": 10.0, "256x32_c2/3/1": 6.5,
             "64x256_c2_pp/0/1": 6.0, "64x256_c2_pp/1/1": 7.0}
    # It comes from another folder under a committed sweep's name (a device's /tmp copy of a re-run): the table
    # names each source file once.
    (tmp_path / "later").mkdir()
    sweeps.append(tmp_path / "later" / "hopper-sweep-a.json")
    sweeps[-1].write_text(json.dumps(dict(meta={}, rows=[dict(shape="a", K=4096, N=4096, M=256, bits=4, kernel=kern,
                                                              us=us) for kern, us in again.items()])))
    target = tmp_path / "selection.py"
    original = open(selection.__file__).read()
    target.write_text(original)
    monkeypatch.setattr(pick, "SELECTION", target)
    pick.main([str(p) for p in sweeps], write=True)
    capsys.readouterr()
    picked = {"HopperChoice": tuple}
    exec(pick.TABLES.search(target.read_text()).group(0), picked)
    assert picked["HOPPER_TUNED"][(4096, 4096)] == {m: ("256x32_c2", 3, 1) if m == 256 else ("128x64_c2", 3, 1)
                                                 if m >= 64 else None for m in selection.HOPPER_BUCKETS}
    assert picked["HOPPER_TUNED"][(8192, 8192)] == {m: ("64x128_c2_pp", 0, 1) if 64 <= m < selection.HOPPER_BUCKETS[-1]
                                                 else None for m in selection.HOPPER_BUCKETS}
    assert ("from the sweeps\n#   benchmarks/results/hopper-sweep-a.json\n#   benchmarks/results/hopper-sweep-b.json\n"
            "HOPPER_TUNED: " in target.read_text())
    head = original.split("HOPPER_DEFAULT: ")[0]
    assert target.read_text().startswith(head)
    assert target.read_text().endswith(original[original.index("\n_config_ids"):])


def test_pick_hopper_units_overrides_only_clear_wins(pick, tmp_path, monkeypatch, capsys):
    """pick_hopper.py --units --write: a width's own choice where its sweep times one >= 5 % faster than the shared
    table's choice (a ping-pong config at the slower of its two timings), nothing where the shared table keeps the
    Marlin kernels; the table replaces the old one in place, the rest of selection.py unchanged.  Sweeps of the
    other kind are refused in either mode."""
    monkeypatch.setattr(selection, "HOPPER_TUNED", {(8192, 8192): {64: ("128x64_c2", 2, 2), 128: ("128x128_c2", 3, 1),
                                                                   256: None}})
    times = {64: {"128x64_c2/2/2": 10.0, "256x64_c2/0/1": 9.4},  # 3-bit: 6 % faster, an override
             128: {"128x128_c2/3/1": 10.0, "64x128_c2_pp/0/1": 8.0, "64x128_c2_pp/1/1": 9.6},  # 4 %: none
             256: {"128x256_c2/0/1": 5.0}}  # the shared table keeps Marlin here
    rows = [dict(shape="s", K=8192, N=8192, M=m, bits=bits, kernel=k,
                 us=9.8 if (bits, m, k) == (2, 64, "256x64_c2/0/1") else us)  # 2-bit: 2 % faster, none
            for bits in (3, 2) for m, t in times.items() for k, us in {**t, "marlin": 20.0, "cublas_fp16": 20.0}.items()]
    sweep = tmp_path / "hopper-sweep-lowbit.json"
    sweep.write_text(json.dumps(dict(meta={}, rows=rows)))
    target = tmp_path / "selection.py"
    original = open(selection.__file__).read()
    target.write_text(original)
    monkeypatch.setattr(pick, "SELECTION", target)
    pick.units_main([str(sweep)], write=True)
    capsys.readouterr()
    picked = {"HopperChoice": tuple}
    block = pick.UNITS_TABLE.search(target.read_text()).group(0)
    exec(block, picked)
    assert picked["HOPPER_UNITS_TUNED"] == {3: {(8192, 8192): {64: ("256x64_c2", 0, 1)}}}
    assert block.startswith("#   benchmarks/results/hopper-sweep-lowbit.json\n")
    old = pick.UNITS_TABLE.search(original)
    assert target.read_text() == original[:old.start()] + block + original[old.end():]
    four_bit = tmp_path / "hopper-sweep-4.json"
    four_bit.write_text(json.dumps(dict(meta={}, rows=[dict(rows[0], bits=4)])))
    with pytest.raises(SystemExit, match="4-bit rows"):
        pick.units_main([str(four_bit)], write=False)
    with pytest.raises(SystemExit, match="use --units"):
        pick.main([str(sweep)], write=False)
    partial = tmp_path / "hopper-sweep-configs.json"
    partial.write_text(json.dumps(dict(meta={}, rows=[r for r in rows if r["kernel"] != "128x64_c2/2/2"])))
    with pytest.raises(SystemExit, match="do not time the shared table's choice 128x64_c2/2/2"):
        pick.units_main([str(partial)], write=False)


def test_committed_tables_are_what_their_sweeps_pick(pick, tmp_path, monkeypatch, capsys):
    """selection.py's tables are exactly what pick_hopper.py makes from the committed sweeps their comments name
    (the 4/8-bit sweeps for HOPPER_DEFAULT / HOPPER_TUNED, the units' for HOPPER_UNITS_TUNED): a table edited by
    hand, or a sweep file changed or gone, fails here."""
    source = open(selection.__file__).read()
    tuned, units = pick.committed_sweeps(units=False), pick.committed_sweeps(units=True)
    assert len(tuned) >= 3 and all("lowbit" not in p for p in tuned)
    assert units and all("lowbit" in p and os.path.exists(p) for p in units)
    target = tmp_path / "selection.py"
    target.write_text(source)
    monkeypatch.setattr(pick, "SELECTION", target)
    pick.main(tuned, write=True)
    pick.units_main(units, write=True)
    capsys.readouterr()
    assert target.read_text() == source
