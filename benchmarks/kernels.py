"""Our kernels side by side with cuBLAS fp16 and (when importable) vLLM's marlin_gemm / machete_mm.

The grid of ../shared/device/anchor_kernels.py: Llama-3-8B and -70B layer shapes, M from 1 to 1024, 4-bit
symmetric g128 fp16 unless a variant says otherwise.  Weights are random (speed does not depend on values);
each kernel is timed by replaying a CUDA graph that cycles through enough weight copies to defeat the 50 MB L2.

    python benchmarks/kernels.py                       # full grid, writes benchmarks/results/kernels-<date>.json
    MS=1,16 SHAPES=8b.o,70b.down VARIANTS=base python benchmarks/kernels.py   # a quick subset

Env: MS, SHAPES (comma lists), VARIANTS (comma list of base, marlin, act_order, act_order_gather, bf16, w8,
w3, w2, w3_marlin, w2_marlin, w3_units, w2_units, w3_widen, w2_widen, exllama, exllama3; default
base,marlin,act_order,bf16,w8,w3,w2): w3 / w2 are 3- and 2-bit g128 on the plugin's path (selection.hopper_choice:
Marlin kernels, on sm_90 the Hopper GEMM on the units or, from selection.WIDEN_MIN_M, on a 4-bit copy); for tuning
w3_marlin / w2_marlin the Marlin kernels alone, w3_units / w2_units and w3_widen / w2_widen the Hopper GEMM on the
units (the width's table choice, selection.table_choice) / on the 4-bit copy (the 4-bit choice) at every M >= 9;
exllama3 the 3-bit ExLlama GEMM.  SWEEP=1
(tuning: time the Marlin kernel under forced split configurations instead of the grid; 4-bit, BITS=8 / 3 / 2 for
those widths, ROWS=8/16/32/64 to force the block-tile rows too, WGMMA=1/-1 the wgmma loop on/off, SLICES=2/4 global
split-K slices on top of each cluster split (fp32 workspace and the reduce kernel, timed with them; configs print as
sb:csxSLICES), never dense),
ABUF=1/2 (grid and SWEEP=1: force the Marlin kernels' staged A buffers; default automatic),
SWEEP=hopper (tuning: every Hopper GEMM config and decomposition against the Marlin path and cuBLAS; JSON rows for
benchmarks/pick_hopper.py; CONFIGS=a,b: only those configs), TP=2 (one tensor-parallel rank's shard of each shape),
OUT_JSON (output path), NO_VLLM=1
(skip vLLM), WARM=1 (grid: time every kernel after SWEEP_WARMUP_S of its own replays, as the sweep does).
JSON: {"meta": {gpu, date, command, torch, vllm, copy_TBps}, "rows": [{shape, K, N, M, kernel, us, dtype, bits,
group_size, act_order, weight_TBps, speedup_vs_fp16}]}.  Reference kernels: cublas_fp16, vllm_marlin,
vllm_machete; ours start with mygptq: `mygptq` is what the plugin's op runs (the Marlin kernels at decode sizes,
on sm_90 the Hopper GEMM where the tuned table picks it), `mygptq_marlin` the Marlin kernels alone.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root, for gptq_vllm

SHAPES = {
    "8b.qkv": (4096, 6144), "8b.o": (4096, 4096), "8b.gate_up": (4096, 28672), "8b.down": (14336, 4096),
    "70b.qkv": (8192, 10240), "70b.o": (8192, 8192), "70b.gate_up": (8192, 57344), "70b.down": (28672, 8192),
}
G = 128
L2_DEFEAT = 512 << 20
# The Hopper sweep times each candidate (and cuBLAS and the Marlin path) after this long of its own replays: timed
# straight after a lighter kernel, a heavy GEMM runs on the power headroom that one left, which reorders close configs
# (the same kernel twice: up to 27 % apart at M >= 256 on the H100; docs/kernels.md, "Burst and sustained timings").
# The grid keeps burst timings by default, comparable with its earlier runs and with the reference kernels timed the
# same way; WARM=1 times each of its kernels warmed too, where kernels of one row are compared with each other (the
# 2/3-bit op against the 4-bit one: timed third and fourth, they ran on less headroom than the 4-bit op timed second).
SWEEP_WARMUP_S = 0.1
GRID_WARMUP_S = SWEEP_WARMUP_S if os.environ.get("WARM") == "1" else 0.0
A_BUFFERS = int(os.environ.get("ABUF", "0"))  # the Marlin kernels' staged A buffers (0: automatic)


def timed(fn_list, iters=20, warmup_s=None):
    """fn_list: zero-arg callables (one per weight copy), captured into one CUDA graph; us per call, best of 5 runs of
    `iters` replays after `warmup_s` seconds of replays (default: the grid's, GRID_WARMUP_S)."""
    warmup_s = GRID_WARMUP_S if warmup_s is None else warmup_s
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fn_list:
            f()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fn_list:
            f()
    g.replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    while time.perf_counter() - start < warmup_s:
        for _ in range(iters):
            g.replay()
        torch.cuda.synchronize()
    best = math.inf
    for _ in range(5):
        st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        st.record()
        for _ in range(iters):
            g.replay()
        en.record()
        torch.cuda.synchronize()
        best = min(best, st.elapsed_time(en) * 1000 / (iters * len(fn_list)))
    return best


def _setup(default_ms: str):
    """Our kernels (None, with the reason printed, when they do not load) and the MS / SHAPES selections."""
    from gptq_vllm.kernels import cuda as ours

    if not ours.available():
        print("our kernels are not available:", ours.load_error())
        return None, [], {}
    ms = [int(x) for x in os.environ.get("MS", default_ms).split(",")]
    names = os.environ.get("SHAPES")
    shapes = {k: SHAPES[k] for k in names.split(",")} if names else SHAPES
    tp = int(os.environ.get("TP", "1"))
    if A_BUFFERS:
        ours.marlin_set_config(a_buffers=A_BUFFERS)
    if tp > 1:  # one rank's shard: column-parallel layers (qkv, gate_up) split N, row-parallel ones (o, down) K
        shapes = {f"{k}/tp{tp}": ((K, N // tp) if k.endswith(("qkv", "gate_up")) else (K // tp, N))
                  for k, (K, N) in shapes.items()}
    return ours, ms, shapes


def our_gemm(x, q, s, hs, hz, bits, perm=None):
    """What the plugin's op runs for this call (gptq_vllm.kernels.ops.marlin_gemm_cuda itself): the Marlin kernels,
    or on sm_90 the Hopper GEMM where selection.hopper_choice picks it for this M (2/3-bit: on a 4-bit copy)."""
    from gptq_vllm.kernels import ops

    return ops.marlin_gemm_cuda(x, q, s, None, perm, None, hs, hz, bits, G, x.shape[1], s.shape[1])


def hopper_scales(marlin_scales, K):
    """The Hopper GEMM's plain scales for Marlin-permuted ones (None where it cannot run)."""
    from gptq_vllm.formats import hopper
    from gptq_vllm.kernels import selection

    if not selection.hopper_available(marlin_scales.device):
        return None
    return hopper.operands(None, marlin_scales, bits=4, group_size=G, in_rows=K).scales


def load_vllm():
    if os.environ.get("NO_VLLM") == "1":
        return None
    try:
        import vllm
        from vllm import _custom_ops as ops
        from vllm.model_executor.layers.quantization.utils.marlin_utils import (
            marlin_make_workspace_new, marlin_permute_scales)
        from vllm.scalar_type import scalar_types
        return dict(version=vllm.__version__, ops=ops, st=scalar_types, ws=marlin_make_workspace_new,
                    permute_scales=marlin_permute_scales)
    except Exception as e:  # noqa: BLE001
        print("vLLM not importable, reference kernels skipped:", repr(e)[:200], flush=True)
        return None


def vllm_marlin(V: dict, gq: torch.Tensor, s: torch.Tensor, K: int, N: int, ws: torch.Tensor):
    """x -> vLLM's marlin_gemm(x, W), the call the grid times, for GPTQ 4-bit words gq [K/8, N] (repacked here)
    and fp16 g128 scales s [K/G, N]; V from load_vllm(), ws its workspace."""
    ops, st = V["ops"], V["st"]
    empty = torch.empty(0, dtype=torch.int, device=gq.device)
    q = ops.gptq_marlin_repack(gq, empty, K, N, 4)
    ps = V["permute_scales"](s, K, N, G)
    return lambda x: ops.marlin_gemm(x, None, q, None, ps, None, None, None, empty, empty, ws, st.uint4b8, x.shape[0],
                                     N, K, True, False, True, False)


def main() -> int:
    from gptq_vllm.kernels import selection

    ours, ms, shapes = _setup("1,16,32,64,128,256,1024")
    if ours is None:
        return 1
    dev = torch.device("cuda")
    torch.manual_seed(0)
    variants = set(os.environ.get("VARIANTS", "base,marlin,act_order,bf16,w8,w3,w2").split(","))
    props = torch.cuda.get_device_properties(0)
    V = load_vllm()
    print("device", props.name, "SMs", props.multi_processor_count, "torch", torch.__version__,
          "vllm", V and V["version"], flush=True)
    a = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    copy_tbs = 2 * a.numel() / (timed([lambda: b.copy_(a)], iters=5) * 1e-6) / 1e12
    del a, b
    print(f"copy bandwidth (read+write) {copy_tbs:.2f} TB/s", flush=True)

    rows = []
    ws = V["ws"](dev) if V else None
    for name, (K, N) in shapes.items():
        q_bytes = {b: K * N * b // 8 + (K // G) * N * 2 for b in (2, 3, 4, 8)}
        f_bytes = K * N * 2
        nq = max(1, min(64, math.ceil(L2_DEFEAT / q_bytes[4])))
        nq8 = max(1, min(64, math.ceil(L2_DEFEAT / q_bytes[8])))
        nf = max(1, min(16, math.ceil(L2_DEFEAT / f_bytes)))
        fw = [torch.randn(N, K, device=dev, dtype=torch.float16) * 0.02 for _ in range(nf)]
        mq = [torch.randint(-2**31, 2**31 - 1, (K // 16, N * 2), dtype=torch.int32, device=dev) for _ in range(nq)]
        sc = [(torch.rand(K // G, N, device=dev) * 0.01 + 0.001).half() for _ in range(nq)]
        scb = [s.bfloat16() for s in sc]
        hs = [hopper_scales(s, K) for s in sc]
        hsb = [None if h is None else h.bfloat16() for h in hs]
        mq8 = ([torch.randint(-2**31, 2**31 - 1, (K // 16, N * 4), dtype=torch.int32, device=dev) for _ in range(nq8)]
               if "w8" in variants else [])
        # 2/3-bit Marlin words: units of 2 / 4 k-tiles, qweight [K/32, 2N] / [K/64, 6N] (formats/marlin.py).
        low_shape = {3: (K // 64, N * 6), 2: (K // 32, N * 2)}
        mql = {b: [torch.randint(-2**31, 2**31 - 1, low_shape[b], dtype=torch.int32, device=dev) for _ in range(nq)]
               for b in (3, 2) if {f"w{b}", f"w{b}_marlin", f"w{b}_widen", f"w{b}_units"} & variants}
        perm = torch.randperm(K, device=dev).to(torch.int32)
        exq = ([torch.randint(-2**31, 2**31 - 1, (K // 8, N), dtype=torch.int32, device=dev) for _ in range(nq)]
               if "exllama" in variants else [])
        exz = torch.full((K // G, N // 8), 0x77777777, dtype=torch.int32, device=dev)
        exq3 = ([torch.randint(-2**31, 2**31 - 1, (K * 3 // 32, N), dtype=torch.int32, device=dev)
                 for _ in range(max(1, min(64, math.ceil(L2_DEFEAT / q_bytes[3]))))] if "exllama3" in variants else [])
        exz3 = torch.full((K // G, N * 3 // 32), 0, dtype=torch.int32, device=dev)
        if V:
            ops, st = V["ops"], V["st"]
            gq = [torch.randint(-2**31, 2**31 - 1, (K // 8, N), dtype=torch.int32, device=dev) for _ in range(nq)]
            vm = [vllm_marlin(V, q, s, K, N, ws) for q, s in zip(gq, sc)]
            try:
                vmc = [ops.machete_prepack_B(q.t().contiguous().t(), torch.float16, st.uint4b8, torch.float16) for q in gq]
            except Exception as e:  # noqa: BLE001
                print("machete prepack failed", repr(e)[:200], flush=True)
                vmc = None
        for M in ms:
            x = torch.randn(M, K, device=dev, dtype=torch.float16)
            xb = x.bfloat16()
            res = []  # (kernel, us, bytes, dtype, bits, act)
            res.append(("cublas_fp16", timed([lambda w=w: torch.nn.functional.linear(x, w) for w in fw]), f_bytes,
                        "float16", 16, False))
            if "base" in variants:
                res.append(("mygptq", timed([lambda q=q, s=s, h=h: our_gemm(x, q, s, h, None, 4)
                                             for q, s, h in zip(mq, sc, hs)]), q_bytes[4], "float16", 4, False))
            if "marlin" in variants:
                res.append(("mygptq_marlin", timed([lambda q=q, s=s: ours.marlin_gemm(x, q, s, None, None, 4, G)
                                                    for q, s in zip(mq, sc)]), q_bytes[4], "float16", 4, False))
            if "act_order" in variants:
                # act-order absorbed into a row permutation; the op gathers x by perm (while staging A at
                # M = 1, else by one gather kernel), so there is no separate index_select.
                res.append(("mygptq_actorder",
                            timed([lambda q=q, s=s, h=h: our_gemm(x, q, s, h, None, 4, perm)
                                   for q, s, h in zip(mq, sc, hs)]), q_bytes[4], "float16", 4, True))
            if "act_order_gather" in variants:
                res.append(("mygptq_marlin_actorder_gather",
                            timed([lambda q=q, s=s: ours.marlin_gemm(x.index_select(1, perm), q, s, None, None, 4, G)
                                   for q, s in zip(mq, sc)]), q_bytes[4], "float16", 4, True))
            if "bf16" in variants:
                res.append(("mygptq_bf16", timed([lambda q=q, s=s, h=h: our_gemm(xb, q, s, h, None, 4)
                                                  for q, s, h in zip(mq, scb, hsb)]), q_bytes[4], "bfloat16", 4, False))
            if "w8" in variants:
                res.append(("mygptq_w8", timed([lambda q=q, s=s, h=h: our_gemm(x, q, s, h, None, 8)
                                                for q, s, h in zip(mq8, sc, hs)]), q_bytes[8], "float16", 8, False))
            for b in (3, 2):
                if f"w{b}" in variants:
                    fns = [lambda q=q, s=s, h=h, b=b: our_gemm(x, q, s, h, None, b)
                           for q, s, h in zip(mql[b], sc, hs)]
                    res.append((f"mygptq_w{b}", timed(fns), q_bytes[b], "float16", b, False))
            for b in (3, 2):
                if f"w{b}_marlin" in variants:
                    fns = [lambda q=q, s=s, b=b: ours.marlin_gemm(x, q, s, None, None, b, G) for q, s in zip(mql[b], sc)]
                    res.append((f"mygptq_marlin_w{b}", timed(fns), q_bytes[b], "float16", b, False))
            for b in (3, 2):  # tuning (selection.WIDEN_MIN_M): the widened Hopper path at every M it can take
                choice = selection.hopper_choice(M, K, N) if f"w{b}_widen" in variants and hs[0] is not None else None
                if choice is not None:
                    fns = [lambda q=q, h=h, b=b: ours.hopper_gemm(x, ours.marlin_widen(q, b), h, None, 4, G, *choice)
                           for q, h in zip(mql[b], hs)]
                    res.append((f"mygptq_w{b}_widen", timed(fns), q_bytes[b], "float16", b, False))
            for b in (3, 2):  # tuning: the Hopper GEMM on the units, with the width's table choice, at every M >= 9
                choice = (selection.table_choice(M, K, N, b) if f"w{b}_units" in variants and hs[0] is not None
                          and M >= selection.HOPPER_MIN_M else None)
                if choice is not None:
                    cfg = ours.hopper_configs().index(choice[0])
                    fns = [lambda q=q, h=h, b=b: ours.hopper_gemm(x, q, h, None, b, G, cfg, *choice[1:])
                           for q, h in zip(mql[b], hs)]
                    res.append((f"mygptq_w{b}_units", timed(fns), q_bytes[b], "float16", b, False))
            if "exllama3" in variants:
                res.append(("mygptq_exllama_w3", timed([lambda q=q, s=s: ours.exllama_gemm(x, q, exz3, s, None, 3, G)
                                                        for q, s in zip(exq3, sc)]), q_bytes[3], "float16", 3, False))
            if "exllama" in variants:
                res.append(("mygptq_exllama", timed([lambda q=q, s=s: ours.exllama_gemm(x, q, exz, s, None, 4, G)
                                                     for q, s in zip(exq, sc)]), q_bytes[4], "float16", 4, False))
            if V:
                try:
                    res.append(("vllm_marlin", timed([lambda f=f: f(x) for f in vm]), q_bytes[4], "float16", 4,
                                False))
                except Exception as e:  # noqa: BLE001
                    print("vllm marlin failed", repr(e)[:200], flush=True)
                if vmc is not None:
                    try:
                        res.append(("vllm_machete", timed([lambda q=q, s=s: ops.machete_mm(
                            a=x, b_q=q, b_type=st.uint4b8, b_group_scales=s, b_group_size=G)
                            for q, s in zip(vmc, sc)]), q_bytes[4], "float16", 4, False))
                    except Exception as e:  # noqa: BLE001
                        print("vllm machete failed", repr(e)[:200], flush=True)
            base = res[0][1]
            for kernel, us, nbytes, dtype, bits, act in res:
                row = dict(shape=name, K=K, N=N, M=M, kernel=kernel, us=round(us, 2), dtype=dtype, bits=bits,
                           group_size=G if bits != 16 else None, act_order=act,
                           weight_TBps=round(nbytes / (us * 1e-6) / 1e12, 3), speedup_vs_fp16=round(base / us, 3))
                rows.append(row)
                print(json.dumps(row), flush=True)
        del fw, mq, sc, scb, hs, hsb, mq8, exq, mql, exq3
        if V:
            del gq, vm, vmc
        torch.cuda.empty_cache()

    date = datetime.date.today().isoformat()
    default = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"kernels-{date}.json")
    out = os.environ.get("OUT_JSON", default)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    env = {k: os.environ[k] for k in ("MS", "SHAPES", "VARIANTS", "NO_VLLM", "TP", "ABUF", "WARM") if k in os.environ}
    meta = dict(gpu=props.name, sms=props.multi_processor_count, date=date, torch=torch.__version__,
                vllm=V and V["version"], copy_TBps=round(copy_tbs, 3), library=ours.library_path(),
                command=" ".join([f"{k}={v}" for k, v in env.items()] + ["python"] + [shlex.quote(a) for a in sys.argv]))
    with open(out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print("wrote", out, flush=True)
    table(rows)
    return 0


def sweep_weights(K, N, bits, dev):
    """Random Marlin words and scales (enough copies to defeat the L2) and fp16 weights of a shape: the bytes
    one quantized copy holds, and the three lists."""
    qb = K * N * bits // 8 + (K // G) * N * 2
    nq = max(1, min(64, math.ceil(L2_DEFEAT / qb)))
    unit = {2: 2, 3: 4}.get(bits, 1)  # k-tiles per qweight row (formats/marlin.py units)
    shape = (K // (16 * unit), N * unit * bits // 2)
    mq = [torch.randint(-2**31, 2**31 - 1, shape, dtype=torch.int32, device=dev) for _ in range(nq)]
    sc = [(torch.rand(K // G, N, device=dev) * 0.01 + 0.001).half() for _ in range(nq)]
    fw = [torch.randn(N, K, device=dev, dtype=torch.float16) * 0.02
          for _ in range(max(1, min(16, math.ceil(L2_DEFEAT / (K * N * 2)))))]
    return qb, mq, sc, fw


def sweep() -> int:
    """Tuning helper: for each shape and M, the automatic choice against forced (sb, cs) configurations."""
    ours, ms, shapes = _setup("1,16,32,64")
    if ours is None:
        return 1
    dev = torch.device("cuda")
    bits = int(os.environ.get("BITS", "4"))
    rows = int(os.environ.get("ROWS", "0"))  # force the block-tile rows of the tried configurations
    wgmma = int(os.environ.get("WGMMA", "0"))  # 1 / -1: force the wgmma loop of 64-row tiles on / off
    slices = int(os.environ.get("SLICES", "1"))  # global split-K slices of every tried configuration
    cfgs = [(sb, cs) for sb in (1, 2, 4, 8) for cs in (1, 2, 4, 8)]
    lines = []
    for name, (K, N) in shapes.items():
        qb, mq, sc, fw = sweep_weights(K, N, bits, dev)
        for M in ms:
            x = torch.randn(M, K, device=dev, dtype=torch.float16)
            cub = timed([lambda w=w: torch.nn.functional.linear(x, w) for w in fw], iters=10)
            fns = [lambda q=q, s=s: ours.marlin_gemm(x, q, s, None, None, bits, G) for q, s in zip(mq, sc)]
            res = {}
            ours.marlin_set_config(0, 0, 0, 0, a_buffers=A_BUFFERS)
            res["auto"] = timed(fns, iters=10)
            if M >= 100 and not rows:
                ours.marlin_set_config(0, 0, 0, 1, a_buffers=A_BUFFERS)
                res["dense"] = timed(fns, iters=10)
                ours.marlin_set_config(0, 0, 0, 100000, a_buffers=A_BUFFERS)
                res["skinny"] = timed(fns, iters=10)
            else:
                for sb, cs in cfgs:
                    if (N // 64) % sb:
                        continue
                    ours.marlin_set_config(sb, cs, slices, 100000 if rows else 0, rows, wgmma, A_BUFFERS)  # forced rows: never dense
                    try:
                        res[f"{sb}:{cs}" + (f"x{slices}" if slices > 1 else "")] = timed(fns, iters=10)
                    except Exception as e:  # noqa: BLE001
                        print("cfg", sb, cs, "failed", repr(e)[:120], flush=True)
            ours.marlin_set_config(0, 0, 0, 0, a_buffers=A_BUFFERS)
            best = min((v, k) for k, v in res.items() if k != "auto")
            line = (f"{name:12s} M={M:<5d} cublas {cub:7.1f}  auto {res['auto']:7.1f} ({cub / res['auto']:.2f}x, "
                    f"{qb / res['auto'] / 1e6:.2f} TB/s)  best {best[1]} {best[0]:7.1f} ({cub / best[0]:.2f}x)")
            print(line, " ".join(f"{k}={v:.1f}" for k, v in res.items()), flush=True)
            lines.append(line)
        del mq, sc, fw
        torch.cuda.empty_cache()
    print("\n".join(lines))
    return 0


HOPPER_DECOMPOSITIONS = ((0, 1), (1, 1), (3, 1), (2, 2))  # (decomposition, splits), csrc/hopper/configs.h


def sweep_hopper() -> int:
    """Tuning: every Hopper GEMM config x decomposition against the Marlin path (auto) and cuBLAS, 4-bit g128
    fp16 (BITS=8 for 8-bit); writes JSON rows {shape, K, N, M, kernel, us} for benchmarks/pick_hopper.py."""
    from gptq_vllm.kernels import selection

    ours, ms, shapes = _setup("16,32,64,128,256,512,1024")
    if ours is None:
        return 1
    dev = torch.device("cuda")
    bits = int(os.environ.get("BITS", "4"))
    names = ours.hopper_configs()
    # CONFIGS: a comma list of config names to time (default all), e.g. the large-tile ones at M >= 2048
    wanted = os.environ.get("CONFIGS", "").split(",") if os.environ.get("CONFIGS") else names
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        print(f"CONFIGS: unknown Hopper configs {unknown}; known: {names}")
        return 1
    out = os.environ.get("OUT_JSON", f"hopper-sweep-{datetime.date.today().isoformat()}.json")
    props = torch.cuda.get_device_properties(0)
    env = {k: os.environ[k] for k in ("SWEEP", "MS", "SHAPES", "BITS", "TP", "CONFIGS") if k in os.environ}
    meta = dict(gpu=props.name, date=datetime.date.today().isoformat(), torch=torch.__version__, configs=names,
                command=" ".join([f"{k}={v}" for k, v in env.items()] + ["python", "benchmarks/kernels.py"]))
    rows = []
    for name, (K, N) in shapes.items():
        _, mq, sc, fw = sweep_weights(K, N, bits, dev)
        hs = [hopper_scales(s, K) for s in sc]
        for M in ms:
            x = torch.randn(M, K, device=dev, dtype=torch.float16)
            res = {"cublas_fp16": timed([lambda w=w: torch.nn.functional.linear(x, w) for w in fw], iters=5,
                                        warmup_s=SWEEP_WARMUP_S),
                   "marlin": timed([lambda q=q, s=s: ours.marlin_gemm(x, q, s, None, None, bits, G)
                                    for q, s in zip(mq, sc)], iters=5, warmup_s=SWEEP_WARMUP_S)}
            for cfg, cname in enumerate(names):
                if cname not in wanted:
                    continue
                for dec, splits in selection.hopper_decompositions(cname, HOPPER_DECOMPOSITIONS):
                    try:
                        res[f"{cname}/{dec}/{splits}"] = timed(
                            [lambda q=q, h=h: ours.hopper_gemm(x, q, h, None, bits, G, cfg, dec, splits)
                             for q, h in zip(mq, hs)], iters=5, warmup_s=SWEEP_WARMUP_S)
                    except Exception as e:  # noqa: BLE001
                        print(name, M, cname, dec, splits, "failed", repr(e)[:160], flush=True)
            for kernel, us in res.items():
                rows.append(dict(shape=name, K=K, N=N, M=M, bits=bits, kernel=kernel, us=round(us, 2)))
            best = min((v, k) for k, v in res.items() if "/" in k)
            print(f"{name:12s} M={M:<5d} cublas {res['cublas_fp16']:8.1f}  marlin {res['marlin']:8.1f}  "
                  f"best hopper {best[1]} {best[0]:8.1f} ({res['marlin'] / best[0]:.2f}x marlin, "
                  f"{res['cublas_fp16'] / best[0]:.2f}x cublas)", flush=True)
        del mq, sc, hs, fw
        torch.cuda.empty_cache()
        # Rewritten after every shape: a sweep cut short by a time limit keeps the shapes it finished.
        with open(out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
        print("wrote", out, "through", name, flush=True)
    return 0


def table(rows):
    kernels = []
    for r in rows:
        if r["kernel"] not in kernels:
            kernels.append(r["kernel"])
    print("\n| shape | M | cublas_fp16 us | " + " | ".join(k for k in kernels if k != "cublas_fp16") + " |")
    print("|---|---|---|" + "---|" * (len(kernels) - 1))
    by = {}
    for r in rows:
        by.setdefault((r["shape"], r["M"]), {})[r["kernel"]] = r
    for (shape, M), d in by.items():
        cells = [f"{d[k]['us']:.1f} ({d[k]['speedup_vs_fp16']:.2f}x)" if k in d else "-"
                 for k in kernels if k != "cublas_fp16"]
        print(f"| {shape} | {M} | {d['cublas_fp16']['us']:.1f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    # The environment chooses the work (see the description): no arguments, only --help, which exits before any.
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    mode = os.environ.get("SWEEP")
    sys.exit(sweep() if mode == "1" else sweep_hopper() if mode == "hopper" else main())
