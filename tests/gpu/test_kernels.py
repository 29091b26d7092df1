"""Our CUDA kernels (csrc/, torch.ops.mygptq_cuda) against the format core's reference.

Run on the GPU machine:  python -m pytest -q tests/gpu/test_kernels.py   (conftest skips it without CUDA).

Tolerance (elementwise, rigorous up to the slack factor): the kernel output y and the fp32 reference r =
x @ W (W dequantized exactly in fp32) differ by at most
    (u_w + K * 2^-22) * (|x| @ |W|)  +  u_o * |r|  (+ 1e-6 absolute)
  u_w = unit roundoff of the weights as the kernel multiplies them: the Marlin kernel rounds s*(q-z) once to
        the activation dtype (u = 2^-11 fp16, 2^-8 bf16; q - z and s are exact), the ExLlama dequant+cuBLAS
        path likewise; the ExLlama small-M path keeps W in fp32 (we still allow u_w);
  K * 2^-22 covers fp32 accumulation (gamma_K = K * 2^-24 for a recursive sum; x4 for tensor-core
        accumulation, whose internal alignment may truncate) and the split-K partial sums;
  u_o = rounding of the output to fp16/bf16.
x is exactly representable in its dtype and the scales are drawn representable in the activation dtype,
so no other error enters.  A layout or index bug produces O(|r|) errors, orders of magnitude above this.
"""

from __future__ import annotations

import pytest
import torch

from gptq_vllm.formats import act_order, bitpack, exllama, hopper, kernel_layout, marlin
from gptq_vllm.formats.gptq import QuantizedWeight
from gptq_vllm.formats.kernel_layout import Layout
from gptq_vllm.formats.reference import dequantize, reference_matmul
from gptq_vllm.kernels import selection

pytestmark = pytest.mark.gpu

DTYPES = [torch.float16, torch.bfloat16]
MS = [1, 7, 16, 64, 333, 2048]
UNIT = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


@pytest.fixture(scope="module")
def kern():
    from gptq_vllm.kernels import cuda

    if not cuda.available():
        pytest.fail(f"CUDA kernels did not load: {cuda.load_error()}")
    return cuda


def make_weight(bits, group_size, sym, act, K, N, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    ng = act_order.num_groups(K, group_size)
    codes = torch.randint(0, 2**bits, (K, N), generator=g, dtype=torch.int32)
    codes[0] = 0
    codes[1] = 2**bits - 1
    if sym:
        zeros = torch.full((ng, N), 2 ** (bits - 1), dtype=torch.int32)
    else:
        zeros = torch.randint(0, 2**bits, (ng, N), generator=g, dtype=torch.int32)
        zeros[0, 0] = 0
        zeros[-1, -1] = 2**bits - 1
    scales = (torch.rand(ng, N, generator=g) * 0.02 + 1e-3).to(dtype).to(torch.float32)
    g_idx = act_order.default_g_idx(K, group_size)
    if act and group_size != -1:
        g_idx = g_idx[torch.randperm(K, generator=g)]
    return QuantizedWeight(codes, scales, zeros, g_idx, bits, group_size, sym)


def shard_of(full: QuantizedWeight, rows: int) -> QuantizedWeight:
    """Row-parallel shard (input channels [0, rows)) of an act-order weight: scales of every group kept."""
    return QuantizedWeight(full.codes[:rows].contiguous(), full.scales, full.zeros, full.g_idx[:rows].contiguous(),
                           full.bits, full.group_size, full.sym)


def gather(x: torch.Tensor, kw, k_pad: int) -> torch.Tensor:
    """Zero-pad the activations to K_pad, then gather them by perm (which covers the padded rows too)."""
    if k_pad > x.shape[1]:
        x = torch.nn.functional.pad(x, (0, k_pad - x.shape[1]))
    if kw.perm is not None:
        x = x[:, kw.perm.to(x.device).long()]
    return x.contiguous()


def check_close(y: torch.Tensor, x: torch.Tensor, w: QuantizedWeight, what: str, zero_term: bool = False) -> None:
    """zero_term: the kernel adds a rounded zero term s * (2^(b-1) - z) to s * (q - 2^(b-1)) (the Hopper
    GEMM with zero points), so the weight's rounding is relative to |s * (q - 2^(b-1))| + |s * (2^(b-1) - z)|."""
    dev = y.device
    W = dequantize(w, torch.float32).to(dev)
    xf = x.float()
    ref = reference_matmul(xf, w)  # fp32 in, fp32 out: x @ dequantize(w)
    if zero_term:
        g = w.g_idx.long()
        half = 2 ** (w.bits - 1)
        Wmag = w.scales[g] * ((w.codes - half).abs() + (half - w.zeros[g]).abs()) + W.abs().cpu()
        mag = xf.abs() @ (2 * Wmag).to(dev)
    else:
        mag = xf.abs() @ W.abs()
    K = W.shape[0]
    u = UNIT[x.dtype]
    tol = 1.25 * ((u + K * 2.0**-22) * mag + u * ref.abs()) + 1e-6
    yf = y.float()
    assert torch.isfinite(yf).all(), f"{what}: non-finite output"
    err = (yf - ref).abs()
    bad = err > tol
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        r, c = divmod(i, ref.shape[1])
        raise AssertionError(f"{what}: {int(bad.sum())} / {bad.numel()} elements off; first ({r}, {c}): "
                             f"got {float(yf[r, c])}, want {float(ref[r, c])}, tol {float(tol[r, c])}; "
                             f"max rel err {float((err / (mag + 1e-6)).max()):.3e}")


def to_dev(kw, dev):
    f = lambda t: None if t is None else t.to(dev)  # noqa: E731
    return f(kw.qweight), f(kw.scales), f(kw.qzeros), f(kw.g_idx_sorted)


# ---- Marlin-layout GEMM ---------------------------------------------------------------------------------

def gemm_cases(bits: tuple[int, ...], group_sizes: tuple[int, ...]):
    """bits x group x sym x act-order (act-order is a no-op with one group), with readable test ids."""
    cases = [(b, g, s, a) for b in bits for g in group_sizes for s in (True, False) for a in (False, True)
             if not (a and g == -1)]
    ids = [f"b{b}-g{g}-{'sym' if s else 'asym'}-{'act' if a else 'noact'}" for b, g, s, a in cases]
    return cases, ids


MARLIN_CASES, MARLIN_IDS = gemm_cases((2, 3, 4, 8), (-1, 32, 64, 128))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("bits,group_size,sym,act", MARLIN_CASES, ids=MARLIN_IDS)
def test_marlin_gemm(kern, bits, group_size, sym, act, dtype):
    dev = torch.device("cuda")
    K, N = 300, 200  # both need padding: K -> 384, N -> 256
    w = make_weight(bits, group_size, sym, act, K, N, seed=bits * 100 + group_size + 7 * sym + 3 * act, dtype=dtype)
    kw = kernel_layout.to_kernel(w, Layout.MARLIN, scale_dtype=dtype)
    qw, sc, qz, gs = to_dev(kw, dev)
    k_pad = marlin.stored_rows(qw, bits)
    assert (k_pad, sc.shape[1]) == marlin.padded_shape(K, N, group_size)
    for M in MS:
        x = torch.randn(M, K, generator=torch.Generator().manual_seed(M), dtype=torch.float32).to(dtype).to(dev)
        y = kern.marlin_gemm(gather(x, kw, k_pad), qw, sc, qz, gs, bits, group_size)
        assert y.shape == (M, sc.shape[1]) and y.dtype == dtype
        check_close(y[:, :N], x, w, f"marlin M={M}")
        if kw.perm is not None:
            # Fused gather: the raw [M, K] activations and the permutation over the padded rows.
            y2 = kern.marlin_gemm(x, qw, sc, qz, gs, bits, group_size, kw.perm.to(torch.int32).to(dev))
            assert torch.equal(y2, y), f"marlin fused perm differs from gather + GEMM at M={M}"


SHARD_CASES = [(b, g, s) for b in (2, 3, 4, 8) for g in (32, 128) for s in (True, False)]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("bits,group_size,sym", SHARD_CASES,
                         ids=[f"b{b}-g{g}-{'sym' if s else 'asym'}" for b, g, s in SHARD_CASES])
def test_marlin_gemm_act_order_shard(kern, bits, group_size, sym, dtype):
    """Row-parallel shard of an act-order layer: groups are no longer runs, the kernel takes g_idx_sorted."""
    dev = torch.device("cuda")
    full = make_weight(bits, group_size, sym, True, 512, 192, seed=11 + bits + group_size, dtype=dtype)
    w = shard_of(full, 256)
    kw = kernel_layout.to_kernel(w, Layout.MARLIN, scale_dtype=dtype)
    assert kw.g_idx_sorted is not None and kw.perm is not None
    qw, sc, qz, gs = to_dev(kw, dev)
    for M in MS:
        x = torch.randn(M, 256, generator=torch.Generator().manual_seed(M), dtype=torch.float32).to(dtype).to(dev)
        y = kern.marlin_gemm(gather(x, kw, 256), qw, sc, qz, gs, bits, group_size)
        check_close(y, x, w, f"marlin shard M={M}")
        y2 = kern.marlin_gemm(x, qw, sc, qz, gs, bits, group_size, kw.perm.to(torch.int32).to(dev))
        assert torch.equal(y2, y), f"marlin shard fused perm differs at M={M}"


@pytest.mark.parametrize("group_size", [48, 256])
def test_marlin_gemm_other_group_sizes(kern, group_size):
    dev = torch.device("cuda")
    for bits, sym in ((4, True), (8, False), (3, True), (2, False)):
        w = make_weight(bits, group_size, sym, False, 300, 130, seed=group_size + bits, dtype=torch.float16)
        kw = kernel_layout.to_kernel(w, Layout.MARLIN, scale_dtype=torch.float16)
        qw, sc, qz, gs = to_dev(kw, dev)
        for M in (1, 33, 200):
            x = torch.randn(M, 300, dtype=torch.float32).half().to(dev)
            y = kern.marlin_gemm(gather(x, kw, marlin.stored_rows(qw, bits)), qw, sc, qz, gs, bits, group_size)
            check_close(y[:, :130], x, w, f"marlin G={group_size} b{bits} M={M}")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("K,N", [(4096, 1536), (4096, 6144), (4096, 4096)])
def test_marlin_gemm_llama_shape(kern, bits, K, N):
    """Real layer shapes: several strips per block, split-K at small M, many groups; 4096 x 6144 and
    4096 x 4096 are Llama-3-8B shapes of the tuned table (on the H200: 32/64-row and wgmma tiles, dense)."""
    dev = torch.device("cuda")
    w = make_weight(bits, 128, True, False, K, N, seed=5, dtype=torch.float16)
    kw = kernel_layout.to_kernel(w, Layout.MARLIN, scale_dtype=torch.float16)
    qw, sc, qz, gs = to_dev(kw, dev)
    for M in (1, 16, 24, 48, 64, 100, 127, 256):
        x = torch.randn(M, K, dtype=torch.float32).half().to(dev)
        y = kern.marlin_gemm(x, qw, sc, qz, gs, bits, 128)
        check_close(y, x, w, f"marlin {K}x{N} M={M}")


@pytest.mark.parametrize("bits,sym", [(4, True), (8, False), (3, True), (3, False), (2, True)])
def test_marlin_gemm_forced_splits(kern, bits, sym):
    """Every split path: strips per block, cluster (DSMEM) reduction, global slices, and the dense path, each with
    one and two staged A buffers (parts of several chunks); at M = 1 also the staged act-order gather."""
    dev = torch.device("cuda")
    K, N = 4096, 1536
    w = make_weight(bits, 128, sym, False, K, N, seed=9, dtype=torch.float16)
    kw = kernel_layout.to_kernel(w, Layout.MARLIN, scale_dtype=torch.float16)
    qw, sc, qz, gs = to_dev(kw, dev)
    perm = torch.randperm(K, generator=torch.Generator().manual_seed(5)).to(torch.int32).to(dev)
    try:
        for M in (1, 5, 16, 24, 48, 100):
            x = torch.randn(M, K, dtype=torch.float32).half().to(dev)
            for sb, cs, slices, dense, rows in ((1, 1, 1, 0, 0), (2, 2, 1, 0, 0), (8, 8, 1, 0, 0), (4, 4, 2, 0, 0),
                                                (1, 1, 4, 0, 0), (2, 8, 1, 0, 0), (0, 0, 0, 1, 0), (2, 2, 1, 0, 8),
                                                (4, 2, 1, 0, 16), (1, 2, 2, 0, 16), (8, 1, 1, 0, 32),
                                                (2, 2, 2, 0, 32), (8, 1, 1, 0, 64), (1, 4, 1, 0, 64)):
                for bufs in (1, 2):
                    what = f"marlin forced sb={sb} cs={cs} slices={slices} dense={dense} rows={rows} bufs={bufs} M={M}"
                    kern.marlin_set_config(sb, cs, slices, dense, rows, 0, bufs)
                    y = kern.marlin_gemm(x, qw, sc, qz, gs, bits, 128)
                    check_close(y, x, w, what)
                    if M == 1:
                        y_perm = kern.marlin_gemm(x[:, torch.argsort(perm)], qw, sc, qz, gs, bits, 128, perm)
                        assert torch.equal(y_perm, y), f"{what}: the staged gather differs from the plain GEMM"
    finally:
        kern.marlin_set_config(0, 0, 0, 0, 0, 0, 0)


SOLO_CASES = [(4, True, False), (4, False, True), (8, True, False), (3, True, False), (2, False, False)]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("bits,sym,act", SOLO_CASES,
                         ids=[f"b{b}-{'sym' if s else 'asym'}-{'act' if a else 'noact'}" for b, s, a in SOLO_CASES])
def test_marlin_gemm_16row_builds_agree(kern, bits, sym, act, dtype):
    """The 16-row tiles are compiled twice, for one block per SM (no register cap) and for two; a launch takes the
    first only where it fits in one wave.  Forced onto the same splits (cluster reduction, global slices, a partial
    m-block), the two builds must give bit-identical outputs in the lean and general instantiations; the profiler's
    kernel names show that the override did run each build."""
    dev = torch.device("cuda")
    K, N = 4096, 1024
    w = make_weight(bits, 128, sym, act, K, N, seed=41 + bits + act, dtype=dtype)
    kw = kernel_layout.to_kernel(w, Layout.MARLIN, scale_dtype=dtype)
    qw, sc, qz, gs = to_dev(kw, dev)
    perm = None if kw.perm is None else kw.perm.to(torch.int32).to(dev)

    def builds_run(solo, x):  # the SOLO template argument (last) of the Marlin kernels one forced call launched
        kern.marlin_set_config(1, 1, 1, 100000, 16, 0, 0, solo)
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            kern.marlin_gemm(x, qw, sc, qz, gs, bits, 128, perm)
            torch.cuda.synchronize()
        names = [e.name for e in prof.events() if "marlin_gemm_kernel<" in e.name]
        assert names, "the profiler saw no marlin_gemm_kernel launch"
        return {name.split(">(")[0].rsplit(",", 1)[1].strip() for name in names}

    try:
        x16 = torch.randn(16, K, dtype=torch.float32).to(dtype).to(dev)
        assert builds_run(1, x16) == {"true"} and builds_run(-1, x16) == {"false"}
        for M in (9, 16, 32, 50):
            x = torch.randn(M, K, generator=torch.Generator().manual_seed(M), dtype=torch.float32).to(dtype).to(dev)
            for sb, cs, slices in ((1, 1, 1), (2, 2, 1), (8, 8, 1), (4, 4, 2), (1, 1, 4), (2, 8, 1)):
                ys = []
                for solo in (1, -1):
                    kern.marlin_set_config(sb, cs, slices, 100000, 16, 0, 0, solo)
                    ys.append(kern.marlin_gemm(x, qw, sc, qz, gs, bits, 128, perm))
                what = f"marlin 16-row sb={sb} cs={cs} slices={slices} M={M}"
                assert torch.equal(ys[0], ys[1]), f"{what}: the one- and two-blocks-per-SM builds differ"
                check_close(ys[0], x, w, what)
    finally:
        kern.marlin_set_config(0, 0, 0, 0, 0, 0, 0, 0)


# ---- Hopper mixed-input GEMM (CUTLASS, sm_90a) on the Marlin words ----------------------------------------

def hopper_only(kern):
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Hopper GEMM runs on compute capability 9.0 only")
    assert kern.sm90a_code_runs(), "a Hopper build without the sm_90a code"


def test_hopper_atom_is_the_marlin_tile(kern):
    """The CuTe atom CUTLASS reads the Marlin words through (csrc/hopper/marlin_layout.hpp) against the format
    core's definition, offset by offset."""
    for bits in (4, 8):
        assert torch.equal(kern.hopper_tile_offsets(bits), hopper.tile_offsets(bits)), f"{bits}-bit atom"


HOPPER_CASES = [(b, g, s, a) for b in (2, 3, 4, 8) for g in (-1, 64, 128) for s in (True, False) for a in (False, True)
                if not (a and g == -1)]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("bits,group_size,sym,act", HOPPER_CASES,
                         ids=[f"b{b}-g{g}-{'sym' if s else 'asym'}-{'act' if a else 'noact'}" for b, g, s, a in HOPPER_CASES])
def test_hopper_gemm(kern, bits, group_size, sym, act, dtype):
    """Every tile config and decomposition at M past and inside the tiles, on both mainloops (4/8-bit tiles:
    CUTLASS's; 2/3-bit units: csrc/hopper/unit_mainloop.hpp, every fragment register of every warp); act-order
    through the gather."""
    hopper_only(kern)
    dev = torch.device("cuda")
    # K pads to 1024 (whole tiles, units and stages).  4/8 bit: N = 400 pads to 448, a partial 128/256-row weight
    # tile; the unit mainloop copies whole tiles, so 512 (whole tiles of every config).
    K, N = 1000, 400 if bits in hopper.HOPPER_BITS else 512
    w = make_weight(bits, group_size, sym, act, K, N, seed=41 + bits + group_size + 5 * sym + 3 * act, dtype=dtype)
    kw = kernel_layout.to_kernel(w, Layout.MARLIN, scale_dtype=dtype)
    qw, sc, qz, gs = to_dev(kw, dev)
    k_pad = marlin.stored_rows(qw, bits)
    ops = hopper.operands(qz, sc, bits=bits, group_size=group_size, in_rows=k_pad)
    perm = None if kw.perm is None else kw.perm.to(torch.int32).to(dev)
    names = kern.hopper_configs()
    for M in (17, 64, 333):
        x = torch.randn(M, K, generator=torch.Generator().manual_seed(M), dtype=torch.float32).to(dtype).to(dev)
        xg = gather(x, kw, k_pad)
        for cfg, name in enumerate(names):
            for dec, splits in selection.hopper_decompositions(name, ((0, 1), (1, 1), (2, 3), (3, 1))):
                y = kern.hopper_gemm(xg, qw, ops.scales, ops.zeros, bits, group_size, cfg, dec, splits)
                assert y.shape == (M, sc.shape[1]) and y.dtype == dtype
                check_close(y[:, :N], x, w, f"hopper b{bits} {name} dec={dec}/{splits} M={M}", zero_term=not sym)
        if perm is not None:
            y2 = kern.hopper_gemm(x, qw, ops.scales, ops.zeros, bits, group_size, 0, 0, 1, perm)
            y1 = kern.hopper_gemm(xg, qw, ops.scales, ops.zeros, bits, group_size, 0, 0, 1)
            assert torch.equal(y2, y1), f"hopper gather differs from gathered input at M={M}"


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("K,N", [(4096, 6144), (14336, 4096)])
def test_hopper_gemm_llama_shape(kern, bits, K, N):
    """Llama-3-8B shapes through the op's per-M choice (selection.hopper_choice), deterministic on replay."""
    hopper_only(kern)

    dev = torch.device("cuda")
    w = make_weight(bits, 128, True, False, K, N, seed=7, dtype=torch.float16)
    kw = kernel_layout.to_kernel(w, Layout.MARLIN, scale_dtype=torch.float16)
    qw, sc, qz, gs = to_dev(kw, dev)
    ops = hopper.operands(qz, sc, bits=bits, group_size=128, in_rows=K)
    for M in (17, 32, 64, 128, 256, 1024, 4096):
        choice = selection.hopper_choice(M, K, N)
        if choice is None:
            continue
        x = torch.randn(M, K, dtype=torch.float32).half().to(dev)
        y = kern.hopper_gemm(x, qw, ops.scales, ops.zeros, bits, 128, *choice)
        check_close(y, x, w, f"hopper {K}x{N} M={M} {choice}")
        assert torch.equal(kern.hopper_gemm(x, qw, ops.scales, ops.zeros, bits, 128, *choice), y), "not deterministic"


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("K,N", [(256, 192), (4096, 1536)])
def test_marlin_widen(kern, bits, K, N):
    """2/3-bit Marlin units -> 4-bit Marlin tiles of the codes + 8 - 2^(b-1), bit for bit the format core's packing."""
    codes = torch.randint(0, 2**bits, (K, N), dtype=torch.int32)
    got = kern.marlin_widen(marlin.pack(codes, bits).cuda(), bits).cpu()
    assert torch.equal(got, marlin.pack(codes + 8 - 2 ** (bits - 1), 4))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("bits,sym,act", [(3, True, False), (3, False, True), (2, True, True), (2, False, False)])
def test_2_3_bit_op_paths(kern, bits, sym, act, dtype):
    """The plugin op on a 2/3-bit layer (ops.marlin_gemm_cuda): the Marlin kernels below selection.UNITS_MIN_M and
    where the table says so, the Hopper GEMM on the units (the same choice as 4-bit) elsewhere, for 3 bit from
    WIDEN_MIN_M on a 4-bit copy, each against the reference; zero points through the 2/3-bit Hopper operands (formats.hopper),
    act-order through the op's gather."""
    hopper_only(kern)
    from gptq_vllm.kernels import ops as plugin_ops

    dev = torch.device("cuda")
    K, N = 1024, 512
    w = make_weight(bits, 128, sym, act, K, N, seed=41 + bits + act, dtype=dtype)
    kw = kernel_layout.to_kernel(w, Layout.MARLIN, scale_dtype=dtype)
    qw, sc, qz, _ = to_dev(kw, dev)
    hops = hopper.operands(qz, sc, bits=bits, group_size=128, in_rows=K)
    perm = None if kw.perm is None else kw.perm.to(torch.int32).to(dev)
    for M in sorted({1, 16, 64, 300, selection.UNITS_MIN_M, selection.WIDEN_MIN_M[3] + 100}):
        x = torch.randn(M, K, generator=torch.Generator().manual_seed(M), dtype=torch.float32).to(dtype).to(dev)
        y = plugin_ops.marlin_gemm_cuda(x, qw, sc, qz, perm, None, hops.scales, hops.zeros, bits, 128, K, N)
        check_close(y, x, w, f"b{bits} op M={M}", zero_term=not sym)
        choice = selection.hopper_choice(M, K, N, bits)
        assert choice == (selection.hopper_choice(M, K, N, 4) if M >= selection.UNITS_MIN_M else None)
        if choice is not None:
            q, qbits = (kern.marlin_widen(qw, bits), 4) if selection.widened(M, bits) else (qw, bits)
            direct = kern.hopper_gemm(x, q, hops.scales, hops.zeros, qbits, 128, *choice, perm=perm)
            assert torch.equal(y, direct), f"the op did not take the Hopper path it chose at M={M}"


# Llama-3-8B layers as one rank of tensor parallel 2 holds them (issue 13): column-parallel layers keep K and halve
# N, row-parallel ones halve K (an act-order layer's row shard keeps every group's scales: g_idx_sorted).
TP2_SHARDS = {"qkv": (4096, 3072, False), "o": (2048, 4096, True), "gate_up": (4096, 14336, False),
              "down": (7168, 4096, True)}


@pytest.mark.parametrize("layer", list(TP2_SHARDS))
@pytest.mark.parametrize("bits,act", [(4, False), (4, True), (3, False), (8, True)])
def test_tp2_shards_of_the_llama_shapes(kern, layer, bits, act):
    """Each TP-2 shard through the plugin's op (ops.marlin_gemm_cuda: Marlin kernels, on sm_90 the Hopper GEMM from
    the table, 2/3-bit on their units) at decode and batch sizes, against the reference.  A row-parallel act-order shard
    carries g_idx_sorted and keeps the Marlin kernels (the Hopper GEMM refuses it)."""
    from gptq_vllm.kernels import ops as plugin_ops

    dev = torch.device("cuda")
    K, N, row_parallel = TP2_SHARDS[layer]
    if act and row_parallel:
        w = shard_of(make_weight(bits, 128, True, True, 2 * K, N, seed=13, dtype=torch.float16), K)
    else:
        w = make_weight(bits, 128, True, act, K, N, seed=13, dtype=torch.float16)
    kw = kernel_layout.to_kernel(w, Layout.MARLIN, scale_dtype=torch.float16)
    qw, sc, qz, gs = to_dev(kw, dev)
    rows = marlin.stored_rows(qw, bits)
    why = hopper.unsupported(bits=bits, group_size=128, in_rows=rows, g_idx_sorted=gs is not None)
    hops = hopper.operands(qz, sc, bits=bits, group_size=128, in_rows=rows) \
        if why is None and selection.hopper_available(dev) else None
    assert (gs is not None) == (act and row_parallel)
    perm = None if kw.perm is None else kw.perm.to(torch.int32).to(dev)
    for M in (1, 16, 64, 256):
        x = torch.randn(M, K, generator=torch.Generator().manual_seed(M), dtype=torch.float32).half().to(dev)
        y = plugin_ops.marlin_gemm_cuda(x, qw, sc, qz, perm, gs, None if hops is None else hops.scales,
                                        None if hops is None else hops.zeros, bits, 128, K, N)
        check_close(y, x, w, f"TP-2 {layer} shard b{bits} act={act} M={M}")


def test_hopper_gemm_refuses_what_it_cannot_run(kern):
    hopper_only(kern)
    dev = torch.device("cuda")
    w = make_weight(4, 32, True, False, 256, 128, seed=3, dtype=torch.float16)
    kw = kernel_layout.to_kernel(w, Layout.MARLIN, scale_dtype=torch.float16)
    qw, sc, _, _ = to_dev(kw, dev)
    x = torch.randn(32, 256, dtype=torch.float16, device=dev)
    with pytest.raises(RuntimeError, match="group size must be a multiple of 64"):
        kern.hopper_gemm(x, qw, sc, None, 4, 32, 0)
    with pytest.raises(RuntimeError, match="no config"):
        kern.hopper_gemm(x, qw, sc[:1].repeat(2, 1), None, 4, 128, 999)
    pingpong = [i for i, name in enumerate(kern.hopper_configs()) if name.endswith(selection.PINGPONG_SUFFIX)]
    assert pingpong
    with pytest.raises(RuntimeError, match="runs data-parallel only"):
        kern.hopper_gemm(x, qw, sc[:1].repeat(2, 1), None, 4, 128, pingpong[0], 3, 1)
    # The unit mainloop copies whole tiles: 192 features are not whole 128-feature tiles.
    units = marlin.pack(torch.randint(0, 8, (256, 192), dtype=torch.int32), 3).to(dev)
    wide = kern.hopper_configs().index("128x128_c2")
    with pytest.raises(RuntimeError, match="3-bit units need N to be a multiple of config 128x128_c2's 128 features"):
        kern.hopper_gemm(x, units, torch.ones(2, 192, dtype=torch.float16, device=dev), None, 3, 128, wide)


@pytest.mark.parametrize("k_in,k", [(1000, 1024), (1001, 1024), (118784, 118784)],
                         ids=["aligned-rows", "unaligned-rows", "row-beyond-shared-memory"])
@pytest.mark.parametrize("M", [3, 64, 700])
def test_act_order_gather(kern, k_in, k, M):
    """The activation gather (shared by the Marlin and Hopper paths) equals indexing, bit for bit: a row staged in
    shared memory with 16-byte or 2-byte loads, or read from L2 where it exceeds shared memory; 0 past K_in."""
    hopper_only(kern)
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(k_in + M)
    qw = torch.randint(-2**31, 2**31 - 1, (k // 16, 64 * 4 // 2), generator=g, dtype=torch.int32).to(dev)
    sc = (torch.rand(k // 128, 64, generator=g) / 64).to(torch.float16).to(dev)
    perm = torch.randperm(k, generator=g).to(torch.int32).to(dev)
    x = torch.randn(M, k_in, generator=g).to(torch.float16).to(dev)
    xg = torch.nn.functional.pad(x, (0, k - k_in))[:, perm.long()]
    y = kern.hopper_gemm(x, qw, sc, None, 4, 128, 0, 0, 1, perm)
    assert torch.equal(y, kern.hopper_gemm(xg.contiguous(), qw, sc, None, 4, 128, 0, 0, 1))


WIDE_CASES = [(4, 128, True, False), (4, 128, True, True), (8, 128, False, True), (4, 32, False, False),
              (3, 128, True, False), (3, 128, False, True), (2, 128, True, True), (3, -1, True, False),
              (8, -1, True, False)]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("bits,group_size,sym,act", WIDE_CASES,
                         ids=[f"b{b}-g{g}-{'sym' if s else 'asym'}-{'act' if a else 'noact'}" for b, g, s, a in WIDE_CASES])
def test_marlin_gemm_wide_tiles(kern, bits, group_size, sym, act, dtype):
    """32- and 64-row block tiles (one block per SM; scales on the run sums / on the weights) in the lean and general
    instantiations, with and without the wgmma loop (lean 64-row tiles on sm_90a): act-order (gather kernel,
    then g_idx_sorted), zero points, one group; split-K and a partial last m-block."""
    dev = torch.device("cuda")
    if torch.cuda.get_device_capability() == (9, 0):
        assert kern.sm90a_code_runs(), "a Hopper build without the sm_90a code"
    K, N = 1024, 512
    w = make_weight(bits, group_size, sym, act, K, N, seed=31 + bits + group_size + act, dtype=dtype)
    kw = kernel_layout.to_kernel(w, Layout.MARLIN, scale_dtype=dtype)
    qw, sc, qz, gs = to_dev(kw, dev)
    perm = None if kw.perm is None else kw.perm.to(torch.int32).to(dev)
    try:
        for M in (17, 64, 100):
            x = torch.randn(M, K, generator=torch.Generator().manual_seed(M), dtype=torch.float32).to(dtype).to(dev)
            for sb, cs, slices, rows, wg in ((2, 1, 1, 32, 0), (8, 2, 1, 32, 0), (1, 2, 2, 64, 0), (8, 1, 1, 64, -1),
                                             (8, 1, 1, 64, 1), (4, 2, 1, 64, 1), (4, 1, 2, 64, 1)):
                for bufs in (1, 2):
                    kern.marlin_set_config(sb, cs, slices, 100000, rows, wg, bufs)
                    y = kern.marlin_gemm(x, qw, sc, qz, gs, bits, group_size, perm)
                    check_close(y, x, w, f"marlin wide rows={rows} sb={sb} cs={cs} slices={slices} wgmma={wg} "
                                         f"bufs={bufs} M={M}")
    finally:
        kern.marlin_set_config(0, 0, 0, 0, 0, 0, 0)


# ---- ExLlama-layout GEMM --------------------------------------------------------------------------------

EXL_CASES, EXL_IDS = gemm_cases((2, 3, 4, 8), (-1, 32, 128))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("bits,group_size,sym,act", EXL_CASES, ids=EXL_IDS)
def test_exllama_gemm(kern, bits, group_size, sym, act, dtype):
    dev = torch.device("cuda")
    K, N = 300, 197  # K not a multiple of 32 (short last block), odd N
    w = make_weight(bits, group_size, sym, act, K, N, seed=bits * 10 + group_size + 5 * sym + 2 * act, dtype=dtype)
    kw = kernel_layout.to_kernel(w, Layout.EXLLAMA, scale_dtype=dtype)
    qw, sc, qz, gs = to_dev(kw, dev)
    for M in MS:
        x = torch.randn(M, K, generator=torch.Generator().manual_seed(M), dtype=torch.float32).to(dtype).to(dev)
        y = kern.exllama_gemm(gather(x, kw, K), qw, qz, sc, gs, bits, group_size)
        assert y.shape == (M, N) and y.dtype == dtype
        check_close(y, x, w, f"exllama M={M}")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_exllama_gemm_act_order_shard(kern, bits):
    dev = torch.device("cuda")
    for sym in (True, False):
        full = make_weight(bits, 64, sym, True, 640, 150, seed=bits + 3 * sym, dtype=torch.float16)
        w = shard_of(full, 320)
        kw = kernel_layout.to_kernel(w, Layout.EXLLAMA, scale_dtype=torch.float16)
        assert kw.g_idx_sorted is not None
        qw, sc, qz, gs = to_dev(kw, dev)
        for M in (1, 16, 64):
            x = torch.randn(M, 320, dtype=torch.float32).half().to(dev)
            y = kern.exllama_gemm(gather(x, kw, 320), qw, qz, sc, gs, bits, 64)
            check_close(y, x, w, f"exllama shard b{bits} M={M}")


# ---- repack kernels: bit-exact against the format core ------------------------------------------------

@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("with_perm", [False, True])
def test_marlin_repack(kern, bits, with_perm):
    K, N = 272, 192
    codes = torch.randint(0, 2**bits, (K, N), dtype=torch.int32)
    q = bitpack.pack_rows(codes, bits)
    perm = torch.randperm(K).to(torch.int32) if with_perm else None
    want = marlin.repack_gptq(q, bits, K, perm)
    got = kern.marlin_repack(q.cuda(), None if perm is None else perm.cuda(), bits, K, N)
    assert got.dtype == torch.int32 and torch.equal(got.cpu(), want)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("K", [300, 256])
@pytest.mark.parametrize("with_perm", [False, True])
def test_exllama_shuffle(kern, bits, K, with_perm):
    N = 197
    codes = torch.randint(0, 2**bits, (K, N), dtype=torch.int32)
    q = bitpack.pack_rows(codes, bits)
    perm = torch.randperm(K).to(torch.int32) if with_perm else None
    want = exllama.shuffle(q, bits, K, perm)
    got = kern.exllama_shuffle(q.cuda(), None if perm is None else perm.cuda(), bits, K)
    assert torch.equal(got.cpu(), want)


# ---- torch.library.opcheck ------------------------------------------------------------------------------

def _marlin_args(bits, sym, act, M, dtype=torch.float16):
    w = make_weight(bits, 64, sym, act, 256, 128, seed=3, dtype=dtype)
    if act:
        w = shard_of(make_weight(bits, 64, sym, True, 512, 128, seed=3, dtype=dtype), 256)
    kw = kernel_layout.to_kernel(w, Layout.MARLIN, scale_dtype=dtype)
    qw, sc, qz, gs = to_dev(kw, "cuda")
    x = torch.randn(M, 256, dtype=dtype, device="cuda")
    return (x, qw, sc, qz, gs, bits, 64)


def _exllama_args(bits, sym, act, M, dtype=torch.float16):
    w = make_weight(bits, 32, sym, act, 200, 70, seed=4, dtype=dtype)
    kw = kernel_layout.to_kernel(w, Layout.EXLLAMA, scale_dtype=dtype)
    qw, sc, qz, gs = to_dev(kw, "cuda")
    x = torch.randn(M, 200, dtype=dtype, device="cuda")
    return (x, qw, qz, sc, gs, bits, 32)


@pytest.mark.parametrize("case", ["b4-sym-M1", "b8-asym-M40", "b4-asym-shard-M5", "bf16-b4-M64", "b3-sym-M1",
                                  "b2-asym-M40"])
def test_opcheck_marlin_gemm(kern, case):
    if case == "b4-sym-M1":
        args = _marlin_args(4, True, False, 1)
    elif case == "b3-sym-M1":
        args = _marlin_args(3, True, False, 1)
    elif case == "b2-asym-M40":
        args = _marlin_args(2, False, True, 40)
    elif case == "b8-asym-M40":
        args = _marlin_args(8, False, False, 40)
    elif case == "b4-asym-shard-M5":
        args = _marlin_args(4, False, True, 5)
    else:
        args = _marlin_args(4, True, False, 64, torch.bfloat16)
    torch.library.opcheck(torch.ops.mygptq_cuda.marlin_gemm.default, args)


@pytest.mark.parametrize("bits,M", [(3, 1), (2, 9), (4, 40), (8, 3)])
def test_opcheck_exllama_gemm(kern, bits, M):
    torch.library.opcheck(torch.ops.mygptq_cuda.exllama_gemm.default, _exllama_args(bits, False, True, M))


def test_opcheck_repacks(kern):
    q = bitpack.pack_rows(torch.randint(0, 16, (128, 64), dtype=torch.int32), 4).cuda()
    perm = torch.randperm(128).to(torch.int32).cuda()
    torch.library.opcheck(torch.ops.mygptq_cuda.marlin_repack.default, (q, perm, 4, 128, 64))
    torch.library.opcheck(torch.ops.mygptq_cuda.marlin_repack.default, (q, None, 4, 128, 64))
    q3 = bitpack.pack_rows(torch.randint(0, 8, (100, 33), dtype=torch.int32), 3).cuda()
    torch.library.opcheck(torch.ops.mygptq_cuda.exllama_shuffle.default, (q3, torch.randperm(100).int().cuda(), 3, 100))
    torch.library.opcheck(torch.ops.mygptq_cuda.exllama_shuffle.default, (q3, None, 3, 100))
    for bits in (2, 3):
        units = marlin.pack(torch.randint(0, 2**bits, (128, 192), dtype=torch.int32), bits).cuda()
        torch.library.opcheck(torch.ops.mygptq_cuda.marlin_widen.default, (units, bits))


# ---- CUDA graphs: capture + replay equals eager ---------------------------------------------------------

def _graph_equals_eager(fn, x_static: torch.Tensor, fresh: list[torch.Tensor]):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y_static = fn()
    for x in fresh:
        x_static.copy_(x)
        g.replay()
        torch.cuda.synchronize()
        eager = fn()
        assert torch.equal(y_static, eager), f"graph replay differs from eager (max {float((y_static.float() - eager.float()).abs().max())})"


@pytest.mark.parametrize("M", [1, 16, 100])
def test_cuda_graph_marlin(kern, M):
    args = list(_marlin_args(4, False, False, M))
    x = args[0]
    _graph_equals_eager(lambda: kern.marlin_gemm(x, *args[1:]), x, [torch.randn_like(x) for _ in range(2)])
    args = list(_marlin_args(8, True, True, M))
    x2 = args[0]
    _graph_equals_eager(lambda: kern.marlin_gemm(x2, *args[1:]), x2, [torch.randn_like(x2) for _ in range(2)])
    args = list(_marlin_args(3, True, False, M))
    x3 = args[0]
    _graph_equals_eager(lambda: kern.marlin_gemm(x3, *args[1:]), x3, [torch.randn_like(x3) for _ in range(2)])
    # Act-order: above M = 1 the gather kernel writes the GEMM's A; each replay must gather that replay's input.
    args = list(_marlin_args(4, False, False, M))
    x4 = args[0]
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(M)).to(torch.int32).cuda()
    _graph_equals_eager(lambda: kern.marlin_gemm(x4, *args[1:], perm), x4, [torch.randn_like(x4) for _ in range(2)])
    assert torch.equal(kern.marlin_gemm(x4, *args[1:], perm), kern.marlin_gemm(x4[:, perm.long()].contiguous(), *args[1:]))


def _hopper_args(bits, sym, act, M, dtype=torch.float16):
    w = make_weight(bits, 128, sym, act, 512, 256, seed=6, dtype=dtype)
    kw = kernel_layout.to_kernel(w, Layout.MARLIN, scale_dtype=dtype)
    qw, sc, qz, _ = to_dev(kw, "cuda")
    ops = hopper.operands(qz, sc, bits=bits, group_size=128, in_rows=qw.shape[0] * 16)
    x = torch.randn(M, 512, dtype=dtype, device="cuda")
    perm = None if kw.perm is None else kw.perm.to(torch.int32).cuda()
    return x, qw, ops.scales, ops.zeros, bits, 128, perm


@pytest.mark.parametrize("M,decomposition", [(24, 3), (200, 2), (64, 0)])
def test_cuda_graph_and_opcheck_hopper(kern, M, decomposition):
    """Stream-K / split-K workspaces are allocated during capture; replay equals eager bit for bit."""
    hopper_only(kern)
    x, qw, sc, zr, bits, g, perm = _hopper_args(4, False, True, M)
    splits = 2 if decomposition == 2 else 1  # parts: split-K only
    _graph_equals_eager(lambda: kern.hopper_gemm(x, qw, sc, zr, bits, g, 0, decomposition, splits, perm), x,
                        [torch.randn_like(x) for _ in range(2)])
    torch.library.opcheck(torch.ops.mygptq_cuda.hopper_gemm.default, (x, qw, sc, zr, bits, g, 2, decomposition, splits, perm))


@pytest.mark.parametrize("bits,widened", [(2, False), (3, False), (3, True)])
def test_cuda_graph_2_3_bit_hopper_paths(kern, bits, widened):
    """A 2/3-bit act-order layer at batch sizes of the Hopper GEMM under capture: the gather and the unit mainloop (or
    the widening and the 4-bit mainloop) replay exactly as they ran eagerly."""
    hopper_only(kern)
    from gptq_vllm.kernels import ops as plugin_ops

    K, N = 1024, 512
    M = selection.WIDEN_MIN_M[3] if widened else 256
    w = make_weight(bits, 128, True, True, K, N, seed=77, dtype=torch.float16)
    kw = kernel_layout.to_kernel(w, Layout.MARLIN, scale_dtype=torch.float16)
    qw, sc, qz, _ = to_dev(kw, "cuda")
    hops = hopper.operands(qz, sc, bits=bits, group_size=128, in_rows=K)
    perm = kw.perm.to(torch.int32).cuda()
    x = torch.randn(M, K, dtype=torch.float16, device="cuda")
    assert selection.hopper_choice(M, K, N, bits) is not None and selection.widened(M, bits) == widened
    _graph_equals_eager(lambda: plugin_ops.marlin_gemm_cuda(x, qw, sc, qz, perm, None, hops.scales, hops.zeros, bits,
                                                            128, K, N), x, [torch.randn_like(x) for _ in range(2)])


@pytest.mark.parametrize("M", [1, 16, 100])
def test_cuda_graph_exllama(kern, M):
    args = list(_exllama_args(3, False, True, M))
    x = args[0]
    _graph_equals_eager(lambda: kern.exllama_gemm(x, *args[1:]), x, [torch.randn_like(x) for _ in range(2)])


def test_cuda_graph_repack(kern):
    q = bitpack.pack_rows(torch.randint(0, 16, (128, 64), dtype=torch.int32), 4).cuda()
    perm = torch.randperm(128).to(torch.int32).cuda()
    _graph_equals_eager(lambda: kern.marlin_repack(q, perm, 4, 128, 64), q,
                        [bitpack.pack_rows(torch.randint(0, 16, (128, 64), dtype=torch.int32), 4).cuda()])
    _graph_equals_eager(lambda: kern.exllama_shuffle(q, None, 4, 128), q,
                        [bitpack.pack_rows(torch.randint(0, 16, (128, 64), dtype=torch.int32), 4).cuda()])


def test_no_input_mutation_and_streams(kern):
    """Ops run on the current (non-default) stream and leave their inputs untouched."""
    args = _marlin_args(4, False, False, 8)
    before = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        y = kern.marlin_gemm(*args)
    s.synchronize()
    for a, b in zip(args, before):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
    assert torch.equal(y, kern.marlin_gemm(*args))
