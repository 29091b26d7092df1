"""The benchmark scripts that read measurements (no GPU): benchmarks/compare_grids.py, benchmarks/targets.py,
benchmarks/tuning/marlin_ab.py --compare, benchmarks/tuning/units_vs_tiles.py, benchmarks/tuning/lowbit_m1_bounds.py;
the grid's WARM switch; and every script's --help."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest


def _script(name):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(name.replace("/", "_"), os.path.join(root, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _grid(path, times):
    rows = [dict(shape=s, K=4096, N=4096, M=m, kernel=k, us=us) for (s, m, k), us in times.items()]
    path.write_text(json.dumps(dict(meta={}, rows=rows)))
    return str(path)


def test_compare_grids_prints_ratios_to_the_first_and_their_geometric_means(tmp_path, capsys):
    """Each later grid's time over the first's per point, then per kernel and M the geometric mean over shapes; a
    point that one grid lacks is left out, and --kernels keeps only the kernels named."""
    compare = _script("compare_grids")
    first = _grid(tmp_path / "base.json", {("a", 16, "mygptq"): 10.0, ("b", 16, "mygptq"): 20.0,
                                           ("a", 16, "cublas_fp16"): 8.0, ("b", 16, "cublas_fp16"): 8.0,
                                           ("a", 64, "mygptq"): 30.0})
    second = _grid(tmp_path / "new.json", {("a", 16, "mygptq"): 5.0, ("b", 16, "mygptq"): 40.0,
                                           ("a", 16, "cublas_fp16"): 8.8, ("b", 16, "cublas_fp16"): 8.8})
    third = _grid(tmp_path / "newer.json", {("a", 16, "mygptq"): 5.0, ("b", 16, "mygptq"): 10.0,
                                            ("a", 16, "cublas_fp16"): 8.0, ("b", 16, "cublas_fp16"): 8.0})
    compare.main([first, second, third])
    out = capsys.readouterr().out
    assert "| a | 16 | mygptq | 10.0 | 5.0 (0.50) | 5.0 (0.50) |" in out
    assert "| b | 16 | mygptq | 20.0 | 40.0 (2.00) | 10.0 (0.50) |" in out
    assert "| mygptq | 16 | 2 | 1.000 | 0.500 |" in out
    assert "| cublas_fp16 | 16 | 2 | 1.100 | 1.000 |" in out
    assert "| a | 64 |" not in out
    compare.main([first, second, "--kernels", "mygptq"])
    assert "cublas_fp16" not in capsys.readouterr().out


def test_compare_grids_reads_a_second_run_of_the_same_file(tmp_path, capsys):
    """`FILE.json#KEY` is the run stored under KEY beside `rows` (a before / after pair in one file)."""
    compare = _script("compare_grids")
    path = tmp_path / "pair.json"
    rows = lambda us: [dict(shape="a", K=64, N=64, M=1, kernel="mygptq", us=us)]  # noqa: E731
    path.write_text(json.dumps(dict(meta={}, rows=rows(3.0), before=rows(4.0))))
    compare.main([f"{path}#before", str(path)])
    out = capsys.readouterr().out
    assert "| a | 1 | mygptq | 4.0 | 3.0 (0.75) |" in out
    assert "pair / pair#before (geomean)" in out
    with pytest.raises(KeyError, match="no run 'missing' \\(it has rows, before\\)"):
        compare.main([f"{path}#missing", str(path)])


def test_compare_grids_joins_runs_at_each_points_fastest(tmp_path, capsys):
    """`A+B` is one grid of each point's fastest run (an A/B that alternated builds), points all runs time only."""
    compare = _script("compare_grids")
    one = _grid(tmp_path / "one.json", {("a", 16, "mygptq"): 10.0, ("b", 16, "mygptq"): 20.0, ("c", 16, "mygptq"): 1.0})
    two = _grid(tmp_path / "two.json", {("a", 16, "mygptq"): 12.0, ("b", 16, "mygptq"): 16.0})
    base = _grid(tmp_path / "base.json", {("a", 16, "mygptq"): 20.0, ("b", 16, "mygptq"): 32.0, ("c", 16, "mygptq"): 1.0})
    compare.main([base, f"{one}+{two}"])
    out = capsys.readouterr().out
    assert "| a | 16 | mygptq | 20.0 | 10.0 (0.50) |" in out
    assert "| b | 16 | mygptq | 32.0 | 16.0 (0.50) |" in out
    assert "| c | 16 |" not in out


def test_compare_grids_within_one_grid(tmp_path, capsys):
    """--within KERNEL: KERNEL's time over each other kernel's per point ('-' where a kernel lacks the point), then
    geometric means per kernel and M; --kernels picks the kernels compared."""
    compare = _script("compare_grids")
    grid = _grid(tmp_path / "g.json", {("a", 64, "mygptq"): 10.0, ("a", 64, "mygptq_w3"): 8.0, ("a", 64, "mygptq_w2"): 5.0,
                                       ("b", 64, "mygptq"): 10.0, ("b", 64, "mygptq_w3"): 12.5,
                                       ("a", 64, "cublas_fp16"): 30.0})
    compare.main([grid, "--within", "mygptq", "--kernels", "mygptq_w3,mygptq_w2"])
    out = capsys.readouterr().out
    assert "| a | 64 | 1.25 | 2.00 |" in out and "| b | 64 | 0.80 | - |" in out
    assert "| mygptq_w3 | 64 | 2 | 1.000 |" in out and "| mygptq_w2 | 64 | 1 | 2.000 |" in out
    assert "cublas_fp16" not in out
    with pytest.raises(SystemExit):
        compare.main([grid, grid, "--within", "mygptq"])
    with pytest.raises(SystemExit, match="no 'missing' rows"):
        compare.main([grid, "--within", "missing"])


def test_compare_grids_needs_two_grids(tmp_path):
    compare = _script("compare_grids")
    with pytest.raises(SystemExit):
        compare.main([_grid(tmp_path / "only.json", {("a", 16, "mygptq"): 1.0})])


def test_targets_reads_a_partial_grid(tmp_path, capsys):
    """targets.py on a grid without act-order or 8-bit rows (an A/B run): the points it has, '-' for the others."""
    targets = _script("targets")
    times = {("a", M, k): us for M in (32, 64, 128, 256, 1024)
             for k, us in (("mygptq", 10.0), ("cublas_fp16", 9.0), ("vllm_marlin", 12.0), ("vllm_machete", 11.0),
                           ("mygptq_bf16", 9.0))}
    times[("a", 32, "mygptq_actorder")] = 11.0
    del times[("a", 128, "vllm_marlin")], times[("a", 128, "vllm_machete")]
    path = tmp_path / "ab.json"
    rows = [dict(shape=s, K=4096, N=4096, M=m, kernel=k, us=us, speedup_vs_fp16=times[(s, m, "cublas_fp16")] / us)
            for (s, m, k), us in times.items()]
    path.write_text(json.dumps(dict(meta={}, rows=rows)))
    targets.main(str(path))
    out = capsys.readouterr().out
    assert "| a | 1.10 / 1.10 / - | 0.90 / 0.90 | +10% / - / - / - | 1.00 / 1.00 | - / - | - |" in out


def test_marlin_ab_compare_takes_each_builds_best_run_and_flags_differing_outputs(tmp_path, capsys):
    """marlin_ab.py --compare: per point the best (least) time of each label's runs, NEW / BASE, `DIFFER` where the
    two builds' checksums disagree, and the geometric mean over the points; lines from a text file or a JSON list."""
    ab = _script("tuning/marlin_ab")
    lines = ["old a@1 10.00 aaaa | b@16 40.00 bbbb", "new a@1 6.00 aaaa | b@16 90.00 cccc",
             "old a@1 12.00 aaaa | b@16 50.00 bbbb", "new a@1 5.00 aaaa | b@16 80.00 cccc"]
    text = tmp_path / "ab.txt"
    text.write_text("\n".join(lines) + "\n")
    mean = ab.compare(ab.read_lines(str(text)), "old", "new")
    out = capsys.readouterr().out
    assert "| a@1 | 10.00 | 5.00 | 0.500 | same |" in out
    assert "| b@16 | 40.00 | 80.00 | 2.000 | DIFFER |" in out
    assert mean == pytest.approx(1.0)
    (tmp_path / "ab.json").write_text(json.dumps({"runs": lines}))
    assert ab.read_lines(str(tmp_path / "ab.json") + "#runs") == lines


def test_units_vs_tiles_reads_runs_of_one_file_and_takes_each_configs_fastest(tmp_path, capsys):
    """The units' time over the 4-bit tiles' per config at its fastest decomposition, geometric mean over shapes, with
    cuBLAS of the second sweep over the first's beside it; `FILE#KEY` picks a run stored beside `rows`."""
    ratios = _script("tuning/units_vs_tiles")
    def row(bits, shape, kernel, us):
        return dict(shape=shape, K=64, N=64, M=64, bits=bits, kernel=kernel, us=us)

    four = [row(4, "a", "128x64_c1/0/1", 10.0), row(4, "a", "128x64_c1/3/1", 8.0), row(4, "b", "128x64_c1/0/1", 20.0),
            row(4, "a", "cublas_fp16", 5.0), row(4, "b", "cublas_fp16", 5.0), row(4, "a", "marlin", 1.0)]
    low = [row(3, "a", "128x64_c1/0/1", 4.0), row(3, "b", "128x64_c1/2/2", 40.0), row(3, "a", "cublas_fp16", 5.5),
           row(3, "b", "cublas_fp16", 5.5)]
    path = tmp_path / "sweeps.json"
    path.write_text(json.dumps(dict(meta={}, rows=four, low=low)))
    ratios.main(str(path), f"{path}#low")
    # a: 4 / 8 (the tiles' faster decomposition), b: 40 / 20 -> geometric mean 1.0; cuBLAS 1.1 in both shapes
    assert "| 3 | 64 | 128x64_c1 | 2 | 1.000 | 1.100 |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no run 'lost' \\(it has rows, low\\)"):
        ratios.main(str(path), f"{path}#lost")


@pytest.mark.parametrize("warm, seconds", [("1", "0.1"), (None, "0.0")])
def test_kernels_grid_times_warmed_only_with_warm_1(warm, seconds):
    """WARM=1 gives the grid the sweep's warm-up before each timing; without it the grid keeps burst timings."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "WARM"} | ({"WARM": warm} if warm else {})
    out = subprocess.run([sys.executable, "-c", "import kernels; print(kernels.GRID_WARMUP_S)"], env=env,
                         cwd=os.path.join(root, "benchmarks"), capture_output=True, text=True, check=True).stdout
    assert out.strip() == seconds


def test_sass_counts_finds_the_shortest_mma_loop_and_the_producer_loop():
    """On instructions as cuobjdump prints them (address, text): the steady loop is the shortest backward branch
    around >= 4 of the kernel's MMA kind (an outer loop around it does not count), the producer's loop the shortest
    one issuing a bulk copy without HGMMA."""
    counts = _script("tuning/sass_counts")
    text = ["UBLKCP.S.G", "SYNCS.PHASECHK", "BRA 0x0",                     # producer: 0x00-0x20
            "HMMA.16816", "LOP3", "HMMA.16816", "HMMA.16816", "HMMA.16816", "BRA 0x30",  # steady loop: 0x30-0x70
            "IADD3", "BRA 0x30"]                                          # outer loop: 0x30-0x90
    ins = [(16 * i, t) for i, t in enumerate(text)]
    assert counts.steady_loop(ins, "HMMA") == text[3:9]
    assert counts.steady_loop(ins) is None                               # no HGMMA at all
    assert counts.producer_loop(ins) == text[:3]
    sass = "\n".join(f"        /*{a:04x}*/                   {t} ;" for a, t in ins)
    assert [(a, t) for a, t in counts.INSTR.findall(sass)] == [(f"{a:04x}", t) for a, t in ins]


def test_lowbit_m1_bounds_from_the_fastest_stream_and_the_e2e_share(tmp_path, capsys):
    """Each shape's bound is the 4-bit time less the bytes a narrower code saves at the grid's fastest M = 1 stream
    (here cuBLAS at 2 TB/s); --e2e takes the share of the batch-1 step in the four 8B GEMMs from the measured ratios
    of one run of a results file (FILE#I) and gives the end-to-end ratio with those GEMMs at their bounds."""
    bounds = _script("tuning/lowbit_m1_bounds")
    times = {}
    for s in bounds.MODEL_8B:
        k, n = bounds.SHAPES[s]
        nbytes = {b: bounds.weight_bytes(k, n, b) for b in (16, 4, 3, 2)}
        times[s, 1, "cublas_fp16"] = nbytes[16] / 2e6  # 2 TB/s = 2e6 bytes per us
        for b in (4, 3, 2):
            times[s, 1, bounds.KERNELS[b]] = 5.0 + nbytes[b] / 1e6  # a 5 us fixed part, then 1 TB/s
    grid = tmp_path / "grid.json"
    rows = [dict(shape=s, K=bounds.SHAPES[s][0], N=bounds.SHAPES[s][1], M=m, kernel=k, us=us)
            for (s, m, k), us in times.items()]
    grid.write_text(json.dumps(dict(meta={}, rows=rows)))
    e2e = tmp_path / "e2e.json"
    e2e.write_text(json.dumps(dict(runs=[{"mygptq-3bit_over_mygptq": {"decode-b1": 9.0}},
                                         {"mygptq-3bit_over_mygptq": {"decode-b1": 1.05}}])))
    bounds.main([str(grid)], f"{e2e}#1")
    out = capsys.readouterr().out
    assert "fastest stream at M = 1: 2.00 TB/s" in out
    # 8b.o (4096 x 4096): 4-bit 8.65 MB -> 13.65 us; 3-bit 6.55 MB -> 11.55 us; saving 2.10 MB at 2 TB/s = 1.05 us
    k, n = bounds.SHAPES["8b.o"]
    t4, t3 = 5 + bounds.weight_bytes(k, n, 4) / 1e6, 5 + bounds.weight_bytes(k, n, 3) / 1e6
    bound = t4 / (t4 - (bounds.weight_bytes(k, n, 4) - bounds.weight_bytes(k, n, 3)) / 2e6)
    assert f"| 8b.o | {t4:.1f} | {t4 / t3:.2f} ({bound:.2f}) |" in out
    sum4 = sum(times[s, 1, "mygptq"] for s in bounds.MODEL_8B)
    gemms = sum4 / sum(times[s, 1, "mygptq_w3"] for s in bounds.MODEL_8B)
    saved = sum(bounds.weight_bytes(*bounds.SHAPES[s], 4) - bounds.weight_bytes(*bounds.SHAPES[s], 3)
                for s in bounds.MODEL_8B) / 2e6
    share = (1 - 1 / 1.05) / (1 - 1 / gemms)
    expected = 1 / (1 - share + share * (sum4 - saved) / sum4)
    assert f"end to end 1.050x, so {share:.0%} of the 4-bit step" in out
    assert f"at their bounds: {expected:.3f}x end to end" in out
    for s in bounds.MODEL_8B:  # 3-bit no faster than 4-bit: no share to infer, said instead of divided by zero
        times[s, 1, "mygptq_w3"] = times[s, 1, "mygptq"]
    grid.write_text(json.dumps(dict(meta={}, rows=[dict(shape=s, K=bounds.SHAPES[s][0], N=bounds.SHAPES[s][1], M=m,
                                                       kernel=k, us=us) for (s, m, k), us in times.items()])))
    with pytest.raises(SystemExit, match="not faster at 3 bits in these grids \\(1.000x\\)"):
        bounds.main([str(grid)], f"{e2e}#1")


# Modules the scripts import (run_child / emit, parse_sweep), not scripts: run directly they only define functions.
NOT_SCRIPTS = {"child.py", "sweep_logs.py"}


def test_every_benchmark_script_answers_help():
    """`python SCRIPT --help` prints its usage and exits 0 without doing its work (no GPU, vLLM or data files), for
    every script under benchmarks/."""
    import concurrent.futures
    import glob
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = sorted(glob.glob(os.path.join(root, "benchmarks", "**", "*.py"), recursive=True))
    for path in paths:  # keep the exemption honest: a module that gains a __main__ block is a script
        if os.path.basename(path) in NOT_SCRIPTS:
            assert '__name__ == "__main__"' not in open(path).read(), path
    scripts = [p for p in paths if os.path.basename(p) not in NOT_SCRIPTS]

    def help_of(path):
        return subprocess.run([sys.executable, path, "--help"], capture_output=True, text=True, timeout=120)

    # concurrently: most scripts import torch, a second or more each
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for path, proc in zip(scripts, pool.map(help_of, scripts)):
            name = os.path.relpath(path, root)
            assert proc.returncode == 0, f"{name} --help exited {proc.returncode}:\n{proc.stderr[-2000:]}"
            assert "usage:" in proc.stdout, f"{name} --help printed no usage:\n{proc.stdout[-2000:]}"
