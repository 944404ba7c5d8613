"""Results: the CSV, the compact table, the plots and where we stand on the goals.

    python -m benchmarks.report RESULTS.csv [--png PLOT.png] [--md SUMMARY.md]

reads CSVs the harness wrote (the latest run of each, or ``--all``) and prints
the tables again, with the block-size sweep's and the model benchmark's
results when given; the GPU check calls it last so that the tables survive a
stage that ran out of time.
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Optional

RUN_COLUMNS = ["timestamp", "commit", "device", "torch", "triton", "cuda"]
CASE_COLUMNS = ["grid", "mode", "case", "dtype", "batch", "heads_q", "heads_kv", "seqlen_q", "seqlen_k",
                "head_dim", "causal", "padded", "layout"]
RESULT_COLUMNS = ["provider", "backend", "status", "reason", "p20_ms", "p50_ms", "p80_ms", "tflops", "gbps",
                  "pct_copy_bw", "peak_mem_mb", "max_diff", "speed_vs_best_sdpa", "overhead_us"]
COLUMNS = RUN_COLUMNS + CASE_COLUMNS + RESULT_COLUMNS

NUMERIC = {"batch", "heads_q", "heads_kv", "seqlen_q", "seqlen_k", "head_dim", "causal", "padded", "p20_ms",
           "p50_ms", "p80_ms", "tflops", "gbps", "pct_copy_bw", "peak_mem_mb", "max_diff", "speed_vs_best_sdpa",
           "overhead_us"}


# --------------------------------------------------------------------------- CSV


def _fmt(value) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return "" if value is None else str(value)


def append_rows(path: Path, rows: Iterable[dict], columns: list[str] = COLUMNS) -> None:
    """Append rows (header first if the file is new); written and flushed per call so a
    run cut short still leaves what it measured."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != columns:  # written by an older version: rewrite it under today's columns
            with open(path, newline="") as f:
                old = list(csv.DictReader(f))
            with open(path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
                writer.writeheader()
                writer.writerows({c: r.get(c) or "" for c in columns} for r in old)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({c: _fmt(row.get(c)) for c in columns})


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for c in NUMERIC & row.keys():
            try:
                row[c] = float(row[c]) if row[c] != "" else math.nan
            except ValueError:
                row[c] = math.nan
    return rows


def fill_ratios(rows: list[dict]) -> None:
    """Per case: each provider's speed relative to the best torch SDPA provider (>1 = faster)."""
    best = min((r["p50_ms"] for r in rows if r["provider"].startswith("sdpa") and r["status"] == "ok"),
               default=math.nan)
    for r in rows:
        if r["status"] == "ok" and not math.isnan(best):
            r["speed_vs_best_sdpa"] = best / r["p50_ms"]


# --------------------------------------------------------------------------- table


def _num(x) -> float:
    return x if isinstance(x, float) else math.nan


def _cell(row: dict) -> str:
    if row["status"] != "ok":
        return "-"
    ratio = _num(row.get("speed_vs_best_sdpa"))
    ratio_s = f" {ratio:.2f}x" if not math.isnan(ratio) else ""
    if row["grid"] == "interpreter":
        diff = _num(row.get("max_diff"))
        ms = row["p50_ms"]
        return (f"{ms:.1f}ms" if ms >= 1 else f"{ms * 1e3:.0f}us") + (f" err {diff:.1e}" if not math.isnan(diff) else "")
    if row["grid"] == "cpu":  # time relative to calling torch SDPA directly: the front end's overhead
        over = _num(row.get("overhead_us"))
        return (f"{row['p50_ms'] * 1e3:.0f}us" + (f" {over:+.0f}us" if not math.isnan(over) else "")
                + (f" {1 / ratio:.2f}x" if not math.isnan(ratio) else ""))
    if int(row["seqlen_q"]) == 1:
        pct = _num(row.get("pct_copy_bw"))
        return f"{row['gbps']:.0f}GB/s" + (f" {pct:.0f}%" if not math.isnan(pct) else "") + ratio_s
    return f"{row['tflops']:.0f}{ratio_s}"


def _by_grid(rows: list[dict]) -> dict[str, list[dict]]:
    grids = defaultdict(list)
    for r in rows:
        if r["grid"] != "ceiling":
            grids[r["grid"]].append(r)
    return grids


def auto_vs_own(case_rows: list[dict]) -> float:
    """fastattn's automatic dispatch time over the best of its own forced backends (goal: <= 1.02)."""
    auto = [r["p50_ms"] for r in case_rows if r["provider"] == "fastattn:auto" and r["status"] == "ok"]
    own = [r["p50_ms"] for r in case_rows
           if r["provider"].startswith("fastattn:") and r["provider"] != "fastattn:auto" and r["status"] == "ok"]
    return auto[0] / min(own) if auto and own else math.nan


def table(rows: list[dict]) -> str:
    """One compact table per grid: rows = cases, columns = providers.

    Prefill cells: TFLOP/s and speed relative to the best torch SDPA backend (>1 = faster);
    decode: GB/s, % of the copy bandwidth and the same ratio; CPU: microseconds per call and
    the speed relative to calling torch SDPA directly. Providers that could not run a case
    show "-" and their reasons are listed under the table.
    """
    out = []
    ceilings = [r for r in rows if r["grid"] == "ceiling"]
    for r in ceilings:
        out.append(f"ceiling {r['case']}: {r['reason']}")
    cases = defaultdict(list)
    for r in rows:
        if r["grid"] not in ("cpu", "interpreter", "ceiling"):
            cases[(r["timestamp"], r["grid"], r["case"])].append(r)
    for group in cases.values():  # again: one run's providers may have been timed by two processes
        fill_ratios(group)
    for grid, grows in _by_grid(rows).items():
        providers = list(dict.fromkeys(r["provider"] for r in grows))
        labels = list(dict.fromkeys(r["case"] for r in grows))
        cell = {(r["case"], r["provider"]): r for r in grows}
        unit = {"cpu": "us per call, overhead vs sdpa:auto (torch SDPA called directly), time ratio to it",
                "interpreter": "ms per call under TRITON_INTERPRET=1, max abs error vs torch SDPA"}.get(
            grid, "TFLOP/s or GB/s (% of copy bandwidth); x = speed vs the best torch SDPA backend")
        out.append(f"\n== {grid}: {unit}")
        header = ["case"] + [p.replace("fastattn:", "fa:") for p in providers]
        has_own = any(p.startswith("fastattn:") and p != "fastattn:auto" for p in providers) and \
            "fastattn:auto" in providers and grid not in ("cpu", "interpreter")
        if has_own:
            header.append("auto/own")
        lines = []
        for case in labels:
            line = [case] + [_cell(cell[(case, p)]) if (case, p) in cell else "" for p in providers]
            if has_own:
                ratio = auto_vs_own([r for r in grows if r["case"] == case])
                line.append("" if math.isnan(ratio) else f"{ratio:.3f}")
            lines.append(line)
        widths = [max(len(str(x[i])) for x in [header] + lines) for i in range(len(header))]
        for line in [header] + lines:
            out.append("  ".join(str(x).ljust(w) if i == 0 else str(x).rjust(w)
                                 for i, (x, w) in enumerate(zip(line, widths))))
        if any(r.get("provider") == "fastattn:auto" and r.get("backend") for r in grows):
            chosen = sorted({r["backend"] for r in grows if r["provider"] == "fastattn:auto" and r["backend"]})
            out.append(f"  fa:auto ran: {', '.join(chosen)}")
        skipped = defaultdict(list)
        for r in grows:
            if r["status"] != "ok":
                skipped[(r["provider"], r["status"], r["reason"])].append(r["case"])
        for (provider, status, reason), which in skipped.items():
            where = which[0] if len(which) == 1 else f"{len(which)} cases"
            out.append(f"  {provider} {status} ({where}): {_short(reason)}")
    return "\n".join(out)


def _short(text: str, limit: int = 220) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- goals


def goals(rows: list[dict]) -> list[str]:
    """Where the results stand on issue 4's performance goals (lines for summary.md)."""
    ok = [r for r in rows if r.get("status") == "ok" and r["grid"] not in ("cpu", "interpreter", "ceiling")]
    lines = []

    def fastattn_best(r_case):
        vals = [r for r in r_case if r["provider"].startswith("fastattn:") and r["provider"] != "fastattn:sdpa"]
        return max(vals, key=lambda r: r["tflops"], default=None)

    cases = defaultdict(list)
    for r in ok:
        cases[(r["grid"], r["case"])].append(r)
    for (grid, case), crs in cases.items():
        first = crs[0]
        if first["dtype"] != "bf16" or int(first["head_dim"]) != 128 or first["padded"] or first["mode"] != "fwd":
            continue
        best = fastattn_best(crs)
        sdpa = max((r for r in crs if r["provider"].startswith("sdpa")), key=lambda r: r["tflops"], default=None)
        if best is None:
            continue
        L = int(first["seqlen_q"])
        if L == 1 and first["seqlen_k"] >= 16384:
            pct = _num(best.get("pct_copy_bw"))
            lines.append(f"decode {case}: {best['provider']} {best['gbps']:.0f} GB/s = {pct:.0f}% of copy bandwidth "
                         f"(goal >= 70%): {'met' if pct >= 70 else 'not met'}")
        elif L >= 2048 and not first["causal"] and first["heads_q"] == first["heads_kv"]:
            vs = f", best SDPA {sdpa['provider']} {sdpa['tflops']:.0f}" if sdpa else ""
            lines.append(f"{case}: {best['provider']} {best['tflops']:.0f} TFLOP/s{vs} (goal >= 450, stretch >= SDPA): "
                         f"{'met' if best['tflops'] >= 450 else 'not met'}"
                         + (", beats SDPA" if sdpa and best["tflops"] >= sdpa["tflops"] else ""))
        elif L == 8192 and first["causal"]:
            lines.append(f"{case}: {best['provider']} {best['tflops']:.0f} TFLOP/s (goal >= 400): "
                         f"{'met' if best['tflops'] >= 400 else 'not met'}")
    worst = max(((auto_vs_own(crs), case) for (grid, case), crs in cases.items()
                 if not math.isnan(auto_vs_own(crs))), default=None)
    if worst:
        lines.append(f"automatic dispatch vs best own backend: worst {worst[0]:.3f}x ({worst[1]}) (goal <= 1.02): "
                     f"{'met' if worst[0] <= 1.02 else 'not met'}")
    return lines


# --------------------------------------------------------------------------- plots


def plot(rows: list[dict], path: Path, grid: Optional[str] = None) -> Optional[Path]:
    """One PNG: a panel per group of cases that differ only in sequence (or KV) length,
    a line per provider; TFLOP/s for prefill, GB/s for decode, us per call on the CPU.
    Returns None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no plot; pip install matplotlib)", file=sys.stderr)
        return None
    rows = [r for r in rows if r["status"] == "ok" and r["grid"] != "ceiling" and (grid is None or r["grid"] == grid)]
    if not rows:
        return None
    groups = defaultdict(list)
    for r in rows:
        decode = int(r["seqlen_q"]) == 1
        heads = f"h{int(r['heads_q'])}" + (f"/{int(r['heads_kv'])}" if r["heads_q"] != r["heads_kv"] else "")
        title = (f"{r['grid']} {r['dtype']} d{int(r['head_dim'])} {heads}"
                 + (f" B{int(r['batch'])} decode" if decode else (" causal" if r["causal"] else " full"))
                 + (" pad50%" if r["padded"] else "") + (f" {r['mode']}" if r["mode"] != "fwd" else ""))
        groups[title].append(r)
    n = len(groups)
    cols = min(n, 3)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.6 * nrows), squeeze=False)
    for ax, (title, grs) in zip(axes.flat, groups.items()):
        decode = int(grs[0]["seqlen_q"]) == 1
        cpu = grs[0]["grid"] in ("cpu", "interpreter")
        x_of = (lambda r: r["seqlen_k"]) if decode else (lambda r: r["seqlen_q"])
        y_of = (lambda r: r["p50_ms"] * 1e3) if cpu else (lambda r: r["gbps"]) if decode else (lambda r: r["tflops"])
        for provider in dict.fromkeys(r["provider"] for r in grs):
            pts = sorted((x_of(r), y_of(r)) for r in grs if r["provider"] == provider)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=provider,
                    linewidth=2.2 if provider.startswith("fastattn") else 1.2)
        ax.set_xscale("log", base=2)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("KV length" if decode else "sequence length")
        ax.set_ylabel("us per call" if cpu else "GB/s" if decode else "TFLOP/s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    meta = rows[0]
    fig.suptitle(f"fastattn {meta.get('commit', '')} on {meta.get('device', '')} "
                 f"(torch {meta.get('torch', '')}, triton {meta.get('triton', '')}) {meta.get('timestamp', '')}",
                 fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- CLI


def latest_run(rows: list[dict]) -> list[dict]:
    if not rows:
        return rows
    last = max(r["timestamp"] for r in rows)
    return [r for r in rows if r["timestamp"] == last]


def _plain_rows(path: Optional[Path]) -> list[dict]:
    if path is None or not path.exists() or not path.stat().st_size:
        return []
    with open(path, newline="") as f:
        return latest_run(list(csv.DictReader(f)))


def sweep_summary(rows: list[dict]) -> list[str]:
    """Block-size sweep: the fastest configs per swept case (shape, mask, causal), and today's default."""
    out = []
    cases: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        cases[(r["dtype"], r["head_dim"], r["heads"], r["batch"], r["seqlen"], r.get("mask") or "", r["causal"])].append(r)
    for (_, _, _, _, _, mask, causal), group in cases.items():
        first = group[0]
        out.append(f"sweep {first['dtype']} d{first['head_dim']} h{first['heads']} B{first['batch']} "
                   f"L{first['seqlen']} {'causal' if causal == '1' else 'full'}{' row mask' if mask else ''} "
                   "(MxNxWxS, * = default):")
        ok = sorted((r for r in group if r["status"] == "ok"), key=lambda r: float(r["p50_ms"]))
        shown = ok[:4] + [r for r in ok[4:] if r["default"] == "1"]
        for r in shown:
            out.append(f"  {r['BLOCK_M']}x{r['BLOCK_N']}x{r['num_warps']}x{r['num_stages']}"
                       f"{' *' if r['default'] == '1' else '  '} {float(r['tflops']):7.1f} TFLOP/s"
                       f"  {float(r['vs_default'] or 'nan'):.3f}x default  max_diff {float(r['max_diff']):.1e}")
        failed = [r for r in group if r["status"] != "ok"]
        if failed:
            out.append(f"  {len(failed)} configs failed, e.g. {failed[0]['BLOCK_M']}x{failed[0]['BLOCK_N']}x"
                       f"{failed[0]['num_warps']}x{failed[0]['num_stages']}: {_short(failed[0]['reason'], 120)}")
    return out


def model_summary(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    out = ["model benchmark: tokens/s, peak MiB of the call, speed vs sdpa"]
    for r in rows:
        if r["status"] == "ok":
            out.append(f"  {r['model']:24} {r['measure']:15} {r['attention']:9} B{r['batch']:>3} L{r['seqlen']:>5} ctx{r['context']:>6}"
                       f" {float(r['tokens_per_s']):10.0f} tok/s {float(r['peak_mem_mb'] or 'nan'):8.0f} MiB"
                       f"  {float(r['speed_vs_sdpa'] or 'nan'):.2f}x")
        else:
            out.append(f"  {r['model']:24} {r['measure']:15} {r['attention']:9} error: {_short(r['reason'], 120)}")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.splitlines()[0])
    parser.add_argument("csv", type=Path, nargs="+")
    parser.add_argument("--png", type=Path, help="write one plot of all grids here")
    parser.add_argument("--md", type=Path, help="write the tables and the goals as markdown here")
    parser.add_argument("--all", action="store_true", help="every run in the CSVs (default: the latest run of each)")
    parser.add_argument("--sweep", type=Path, help="a CSV of python -m benchmarks.sweep to summarize too")
    parser.add_argument("--model", type=Path, help="a CSV of python -m benchmarks.model to summarize too")
    args = parser.parse_args(argv)
    rows = []
    for path in args.csv:
        if path.exists() and path.stat().st_size:
            got = read_rows(path)
            rows += got if args.all else latest_run(got)
        else:
            print(f"(no results in {path})")
    sections = [table(rows)]
    sections.append("\n".join(sweep_summary(_plain_rows(args.sweep))))
    sections.append("\n".join(model_summary(_plain_rows(args.model))))
    goal_lines = goals(rows)
    if goal_lines:
        sections.append("goals:\n" + "\n".join(f"  {line}" for line in goal_lines))
    text = "\n\n".join(x for x in sections if x.strip())
    if args.png and rows:
        plot(rows, args.png)
    if args.md:
        meta = rows[0] if rows else {}
        md = [f"# fastattn benchmark: {meta.get('device', '?')}, {meta.get('timestamp', '?')}", "",
              f"commit {meta.get('commit', '?')}, torch {meta.get('torch', '?')}, triton {meta.get('triton', '?')}, "
              f"CUDA {meta.get('cuda', '?')}", "", "```", text, "```"]
        args.md.write_text("\n".join(md) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
