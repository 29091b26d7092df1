"""The Hopper GEMM's selection table (gptq_vllm/kernels/selection.py) from a device sweep.

    python benchmarks/pick_hopper.py benchmarks/results/hopper-sweep-h200-<date>.json [more sweeps ...] [--write]

The sweep (`SWEEP=hopper python benchmarks/kernels.py`) times, per Llama-3 shape and M bucket, the Marlin path
and every Hopper config x decomposition.  Per shape and bucket the table takes the fastest Hopper choice when
it beats the Marlin path by >= 5 % (else None: the Marlin kernels); above M = 128, where the Marlin path is its
dense mode (the weight dequantized into an fp16 copy for each call, then cuBLAS), the Hopper choice, which needs no
copy, stays unless the dense mode beats it by >= 5 %.  The default row, for shapes outside the
table, takes per bucket the candidate (Marlin included) with the smallest geometric mean of time over that
shape's fastest time.  Prints both as Python literals, then the per-point gain over the Marlin path; with
--write, also puts them into gptq_vllm/kernels/selection.py in place of the current tables.  Several sweeps (e.g.
the TP-1 shapes and, with TP=2, one tensor-parallel rank's shards) make one table: rows are keyed by (K, N);
where a later sweep times a (shape, M) point again, its timings replace the earlier ones for that point.  A ping-pong
config's two timings (decompositions 0 and 1, one kernel) count once, at the slower.

    python benchmarks/pick_hopper.py --units benchmarks/results/hopper-sweep-lowbit-h100-<date>.json [--write]

takes the units' sweeps instead (`SWEEP=hopper BITS=3` / `BITS=2`: the Hopper GEMM on 2/3-bit units) and makes
HOPPER_UNITS_TUNED, a width's own choices where one beats the shared table's choice (timed in the same sweep) by
>= 5 %.

    python benchmarks/pick_hopper.py --committed [--units] [new sweeps ...] [--write]

starts from the committed sweeps the table in selection.py names as its sources (its comment), so that new sweeps
(of some shapes or M) replace only their own points.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gptq_vllm.formats.hopper import UNIT_BITS  # noqa: E402
from gptq_vllm.kernels import selection  # noqa: E402
from gptq_vllm.kernels.selection import PINGPONG_SUFFIX  # noqa: E402

MARGIN = 1.05
# Above this M the Marlin path runs dense (csrc/marlin: its split table ends at M = 128, DENSE_MIN_M_DEFAULT = 128).
DENSE_ABOVE_M = 128
SELECTION = Path(__file__).resolve().parent.parent / "gptq_vllm" / "kernels" / "selection.py"
# The two tables in selection.py, from HOPPER_DEFAULT's first line to the closing brace of HOPPER_TUNED.
TABLES = re.compile(r"^HOPPER_DEFAULT: .*?^HOPPER_TUNED: .*?^}\n", re.S | re.M)
# The 2/3-bit overrides, from their comment's sources to the closing brace.
UNITS_TABLE = re.compile(r"^#   benchmarks/results/\S+\n(?:#   \S+\n)*HOPPER_UNITS_TUNED: .*?^}\n", re.S | re.M)


def parse(kernel: str):
    name, dec, splits = kernel.split("/")
    return name, int(dec), int(splits)


def literal(row: dict, indent: int) -> str:
    """A bucket -> choice row as a Python literal, wrapped at 120 columns at `indent` like the source it goes into."""
    items = [f"{m}: " + ("None" if c is None else f'("{c[0]}", {c[1]}, {c[2]})') + "," for m, c in sorted(row.items())]
    lines, line = ["{"], " " * indent
    for item in items:
        if len(line) + len(item) + 1 > 120:
            lines.append(line.rstrip())
            line = " " * indent
        line += item + " "
    lines.append(line.rstrip())
    return "\n".join(lines) + "\n" + " " * (indent - 4) + "}"


def slower_of_same_kernel(t: dict[str, float]) -> None:
    """A ping-pong config runs the same kernel for decomposition 0 and 1 (data-parallel either way), so its two
    timings differ only by the card's state (clocks under the power limit after the config timed before it: up to
    27 % on 64x256_c2_pp in the 2026-12-05 sweep).  Keep one entry, decomposition 0, with the slower timing."""
    for name in {k.split("/")[0] for k in t if "/" in k and k.split("/")[0].endswith(PINGPONG_SUFFIX)}:
        runs = [k for k in t if k.split("/")[0] == name]
        slowest = max(t.pop(k) for k in runs)
        t[f"{name}/0/1"] = slowest


def replace_in_selection(pattern: re.Pattern, text: str, what: str) -> None:
    """Put `text` into selection.py in place of the one block `pattern` matches."""
    source = SELECTION.read_text()
    if len(pattern.findall(source)) != 1:
        raise SystemExit(f"{SELECTION}: cannot find the {what}")
    SELECTION.write_text(pattern.sub(lambda _: text, source))
    print(f"wrote the {what} into {SELECTION}")


def committed_sweeps(units: bool) -> list[str]:
    """The sweeps the current table in selection.py names as its sources (HOPPER_TUNED's, or HOPPER_UNITS_TUNED's)."""
    block = (UNITS_TABLE if units else TABLES).search(SELECTION.read_text()).group(0)
    return [str(SELECTION.parents[2] / name) for name in re.findall(r"^#   (benchmarks/results/\S+\.json)$", block, re.M)]


def read_sweeps(paths: list[str], units: bool):
    """Per (bits, shape, M) the sweeps' timings (a point timed again replaces the earlier timings whole: one run
    per point), and each shape's (K, N).  `units`: the 2/3-bit sweeps, else the 4/8-bit ones."""
    us: dict[tuple[int, str, int], dict[str, float]] = {}
    shape_of: dict[str, tuple[int, int]] = {}
    for path in paths:
        timed: dict[tuple[int, str, int], dict[str, float]] = defaultdict(dict)
        for r in json.loads(Path(path).read_text())["rows"]:
            bits = r.get("bits", 4)
            if (bits in UNIT_BITS) != units:
                raise SystemExit(f"{path}: {bits}-bit rows; "
                                 + ("the 2/3-bit overrides take the units' sweeps (BITS=2 / 3)" if units
                                    else "the units' sweeps make their overrides: use --units"))
            timed[(bits, r["shape"], r["M"])][r["kernel"]] = r["us"]
            shape_of[r["shape"]] = (r["K"], r["N"])
        us.update(timed)
    for t in us.values():
        slower_of_same_kernel(t)
    return us, shape_of


def units_main(paths: list[str], write: bool) -> None:
    """HOPPER_UNITS_TUNED: per width, shape and bucket the units' fastest choice where it beats the shared table's
    choice (selection.table_choice, timed in the same sweep) by >= 5 %; points where the shared table keeps the
    Marlin kernels stay with them."""
    us, shape_of = read_sweeps(paths, units=True)
    tuned: dict[int, dict[tuple[int, int], dict[int, tuple]]] = defaultdict(lambda: defaultdict(dict))
    for (bits, shape, m), t in sorted(us.items()):
        shared = selection.table_choice(m, *shape_of[shape])
        if shared is None:
            continue
        name, dec, splits = shared
        key = f"{name}/0/1" if name.endswith(PINGPONG_SUFFIX) else f"{name}/{dec}/{splits}"
        hopper = {k: v for k, v in t.items() if "/" in k}
        if key not in hopper:
            raise SystemExit(f"{bits}-bit {shape} M={m}: the sweeps do not time the shared table's choice {key} "
                             f"(sweep every config: no CONFIGS=)")
        best = min(hopper, key=hopper.get)
        won = hopper[best] * MARGIN <= hopper[key]
        if won:
            tuned[bits][shape_of[shape]][m] = parse(best)
        print(f"{bits}-bit {shape:12s} M={m:<5d} shared {key:22s} {hopper[key]:8.1f}  best {best:22s} "
              f"{hopper[best]:8.1f} ({hopper[key] / hopper[best]:.2f}x){'  -> override' if won else ''}")
    sources = "".join(f"#   benchmarks/results/{name}\n" for name in dict.fromkeys(Path(p).name for p in paths))
    table = (sources + "HOPPER_UNITS_TUNED: dict[int, dict[tuple[int, int], dict[int, HopperChoice]]] = {\n"
             + "".join(f"    {bits}: {{\n" + "".join(f"        {kn}: {literal(row, 12)},\n" for kn, row in rows.items())
                       + "    },\n" for bits, rows in sorted(tuned.items(), reverse=True)) + "}\n")
    print(table)
    if write:
        replace_in_selection(UNITS_TABLE, table, "HOPPER_UNITS_TUNED table")


def main(paths: list[str], write: bool = False) -> None:
    swept, shape_of = read_sweeps(paths, units=False)
    us = {(shape, m): t for (_, shape, m), t in swept.items()}
    tuned: dict[tuple[int, int], dict[int, object]] = defaultdict(dict)
    lines = []
    for (shape, m), t in us.items():
        hopper = {k: v for k, v in t.items() if "/" in k}
        best = min(hopper, key=hopper.get)
        hopper_wins = (hopper[best] < t["marlin"] * MARGIN if m > DENSE_ABOVE_M
                       else hopper[best] * MARGIN <= t["marlin"])
        choice = parse(best) if hopper_wins else None
        tuned[shape_of[shape]][m] = choice
        lines.append(f"{shape:12s} M={m:<5d} marlin {t['marlin']:8.1f}  best hopper {best:22s} {hopper[best]:8.1f} "
                     f"-> {'hopper' if choice else 'marlin'} ({t['marlin'] / min(hopper[best], t['marlin']):.2f}x "
                     f"marlin, {t['cublas_fp16'] / min(hopper[best], t['marlin']):.2f}x cublas)")
    default = {}
    for m in sorted({m for _, m in us}):
        points = [t for (s, mm), t in us.items() if mm == m]
        cands = set.intersection(*(set(k for k in t if k == "marlin" or "/" in k) for t in points))
        score = {c: math.exp(sum(math.log(t[c] / min(v for k, v in t.items() if k in cands)) for t in points)
                             / len(points)) for c in cands}
        pick = min(score, key=score.get)
        default[m] = None if pick == "marlin" else parse(pick)
    sources = "".join(f"\n#   benchmarks/results/{name}" for name in dict.fromkeys(Path(p).name for p in paths))
    tables = (f"HOPPER_DEFAULT: dict[int, HopperChoice | None] = {literal(default, 4)}\n\n"
              f"# (K, N) -> {{bucket: choice}}, from the sweeps{sources}\n"
              "HOPPER_TUNED: dict[tuple[int, int], dict[int, HopperChoice | None]] = {\n"
              + "".join(f"    {kn}: {literal(row, 8)},\n" for kn, row in tuned.items()) + "}\n")
    print(tables)
    print("\n".join(lines))
    if write:
        replace_in_selection(TABLES, tables, "HOPPER_DEFAULT / HOPPER_TUNED tables")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweeps", nargs="*", metavar="SWEEP",
                    help="Hopper sweep JSON files (SWEEP=hopper of benchmarks/kernels.py); a later one's points "
                         "replace an earlier one's")
    ap.add_argument("--committed", action="store_true",
                    help="start from the committed sweeps the current table in selection.py names as its sources")
    ap.add_argument("--units", action="store_true",
                    help="the 2/3-bit units' sweeps (BITS=2 / 3): make HOPPER_UNITS_TUNED instead")
    ap.add_argument("--write", action="store_true", help="also put the tables into gptq_vllm/kernels/selection.py")
    args = ap.parse_intermixed_args()  # flags before, between or after the files, as the docs write them
    files = (committed_sweeps(args.units) if args.committed else []) + args.sweeps
    if not files:
        ap.error("no sweeps: name sweep files or --committed")
    (units_main if args.units else main)(files, write=args.write)
