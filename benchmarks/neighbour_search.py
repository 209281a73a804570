"""Neighbour search of ``geolinrpe.models.radius``: cell lists against vesin and all pairs.

Uniform random clouds in a cube at a fixed density of 0.45 points per unit volume (side
``(N / 0.45)^(1/3)``), float32 on the CPU:

* ``radius_graph`` with ``r = 2`` (about 15 neighbours per point), ``max_num_neighbors`` None
  and 32;
* ``knn_graph`` with ``k = 16``;
* ``radius_graph_pbc`` on the same cloud as a periodic cubic box (``r = 2``, cap 32).

Methods: ``cells`` (pure-torch cell lists), ``vesin`` (vesin-torch, when installed; not for
``knn_graph``) and ``all`` (every pair: only up to ``--all-max`` points, ``--pbc-all-max``
atoms for the periodic case, and timed once: it is the reference). ``cells`` and ``vesin``
are interleaved (one call of each in turn, ``--repeats`` rounds after a warm-up round) and
the median is reported with its ratio to ``cells`` in the same run; ``equal_to_reference``
compares the edges (and shifts) with ``all`` where it ran, else with ``cells``. The torch
threads and the load average are printed and stored with every record.

    python benchmarks/neighbour_search.py --json neighbour_search.json   # N = 4k, 16k, 100k
    python benchmarks/neighbour_search.py --quick                        # N = 4k, 16k
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from geolinrpe.models import radius as radius_module
from geolinrpe.models.radius import knn_graph, radius_graph, radius_graph_pbc

DENSITY = 0.45
R = 2.0
K = 16


def cloud(n: int, seed: int = 0) -> tuple[torch.Tensor, float]:
    side = (n / DENSITY) ** (1 / 3)
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, generator=g) * side, side


def cases(n: int, pbc: bool):
    """``[(function name, options, {method: call})]`` for a cloud of ``n`` points."""
    pos, side = cloud(n)
    vesin = radius_module._vesin() is not None
    out = []
    if not pbc:
        for cap in (None, 32):
            calls = {
                m: (lambda m=m, cap=cap: radius_graph(pos, R, max_num_neighbors=cap, method=m))
                for m in ("cells", "vesin", "all")
                if m != "vesin" or vesin
            }
            out.append(("radius_graph", f"r={R} cap={cap}", calls))
        calls = {m: (lambda m=m: knn_graph(pos, K, method=m)) for m in ("cells", "all")}
        out.append(("knn_graph", f"k={K}", calls))
    else:
        cell = side * torch.eye(3)[None]
        calls = {
            m: (lambda m=m: radius_graph_pbc(pos, cell, R, method=m))
            for m in ("cells", "vesin", "all")
            if m != "vesin" or vesin
        }
        out.append(("radius_graph_pbc", f"r={R} cap=32 cubic", calls))
    return out


def same(a, b) -> bool:
    if isinstance(a, tuple):
        return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    return torch.equal(a, b)


def timed(call):
    start = time.perf_counter()
    out = call()
    return time.perf_counter() - start, out


def run_case(function, options, calls, n, repeats, all_max) -> list[dict]:
    fast = {m: c for m, c in calls.items() if m != "all"}
    times: dict[str, list[float]] = {m: [] for m in fast}
    results = {}
    for round_ in range(repeats + 1):
        for method, call in fast.items():
            seconds, results[method] = timed(call)
            if round_:  # the first round warms up
                times[method].append(seconds)
    medians = {m: statistics.median(t) for m, t in times.items()}
    if "all" in calls and n <= all_max:
        medians["all"], results["all"] = timed(calls["all"])
        times["all"] = [medians["all"]]
    reference = "all" if "all" in results else "cells"
    records = []
    for method, seconds in medians.items():
        out = results[method]
        edges = (out[0] if isinstance(out, tuple) else out).shape[1]
        records.append(
            {
                "function": function,
                "options": options,
                "method": method,
                "n_points": n,
                "seconds": seconds,
                "ratio_to_cells": seconds / medians["cells"],
                "repeats": len(times[method]),
                "edges": edges,
                "reference": reference,
                "equal_to_reference": same(out, results[reference]),
                "threads": torch.get_num_threads(),
                "load_average": os.getloadavg()[0],
            }
        )
    return records


def table(records: list[dict]) -> str:
    lines = [
        "| function | options | N | method | seconds | x cells | edges | equal | load |",
        "|---|---|---:|---|---:|---:|---:|---|---:|",
    ]
    for r in records:
        lines.append(
            f"| {r['function']} | {r['options']} | {r['n_points']:,} | {r['method']} | "
            f"{r['seconds']:.4f} | {r['ratio_to_cells']:.2f} | {r['edges']:,} | "
            f"{r['equal_to_reference']} ({r['reference']}) | {r['load_average']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--sizes", type=int, nargs="*", default=None)
    p.add_argument("--pbc-sizes", type=int, nargs="*", default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--all-max", type=int, default=None, help="largest N timed with all pairs")
    p.add_argument("--pbc-all-max", type=int, default=1000)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    sizes = a.sizes or ([4096, 16384] if a.quick else [4096, 16384, 100_000])
    pbc_sizes = a.pbc_sizes or ([1000, 4096] if a.quick else [1000, 4096, 16384])
    repeats = a.repeats or (3 if a.quick else 7)
    all_max = a.all_max if a.all_max is not None else (4096 if a.quick else 16384)
    vesin = radius_module._vesin()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, vesin "
        f"{getattr(vesin, '__version__', 'not installed')}, load average "
        f"{os.getloadavg()[0]:.2f}; density {DENSITY}, r = {R}, k = {K}",
        flush=True,
    )
    records = []
    for pbc, group in ((False, sizes), (True, pbc_sizes)):
        for n in group:
            for function, options, calls in cases(n, pbc):
                limit = a.pbc_all_max if pbc else all_max
                new = run_case(function, options, calls, n, repeats, limit)
                for r in new:
                    print(
                        f"{function:<16} {options:<22} N={n:>7} {r['method']:<6} "
                        f"{1000 * r['seconds']:9.1f} ms  x{r['ratio_to_cells']:.2f}  "
                        f"edges {r['edges']}  equal {r['equal_to_reference']}",
                        flush=True,
                    )
                records += new
    print()
    print(table(records))
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps(records, indent=2) + "\n")
    return records


if __name__ == "__main__":
    main(sys.argv[1:])
