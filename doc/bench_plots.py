"""
The benchmark charts of the documentation, from the benchmarks' own tables.

The bench scripts (``bench/*.py``) print Markdown tables; ``bench/README.md``
keeps the tables of the last full run.  Running every benchmark takes minutes,
so the documentation does not: this script copies the tables into
``doc/bench-data.json`` (committed) and draws the charts from that file
(at every docs build).

    python doc/bench_plots.py extract [bench/README.md | NAME=FILE ...]
    python doc/bench_plots.py draw [OUTDIR]

``extract`` reads the README's sections (``## ... (bench/NAME.py)``), or, as
``NAME=FILE``, the saved output of one bench script (``python bench/web.py >
web.txt``, then ``extract web=web.txt``: the other benchmarks' tables are
kept).  The numbers are copied as they were printed, never computed here.
``make bench-plots`` runs extract on bench/README.md, then draw.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DATA = os.path.join(HERE, "bench-data.json")
NAMES = ("fiber", "web", "driver", "orm")


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def tables_of(text: str) -> list[dict[str, Any]]:
    """The Markdown tables of ``text``: header and rows, cells as printed."""
    tables = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if (
            lines[i].startswith("|")
            and i + 1 < len(lines)
            and re.match(r"^\|[\s:|-]+\|$", lines[i + 1].strip())
        ):
            header = _cells(lines[i])
            rows = []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(_cells(lines[i]))
                i += 1
            tables.append({"header": header, "rows": rows})
        else:
            i += 1
    return tables


def sections_of_readme(text: str) -> dict[str, list[dict[str, Any]]]:
    """bench/README.md's tables, by benchmark (the script its heading names)."""
    found = {}
    for part in re.split(r"^## ", text, flags=re.M)[1:]:
        heading = part.splitlines()[0]
        m = re.search(r"bench/(\w+)\.py", heading)
        if m and m.group(1) in NAMES:
            found[m.group(1)] = tables_of(part)
    return found


def extract(args: list[str]) -> None:
    data: dict[str, Any] = {"source": {}, "tables": {}}
    if os.path.exists(DATA):
        with open(DATA) as f:
            data = json.load(f)
    for arg in args or [os.path.join(ROOT, "bench", "README.md")]:
        name, sep, path = arg.partition("=")
        if not sep:
            name, path = "", arg
        with open(path, encoding="utf-8") as f:
            text = f.read()
        rel = os.path.relpath(os.path.abspath(path), ROOT)
        if name:
            if name not in NAMES:
                raise SystemExit(f"unknown benchmark {name!r}: one of {NAMES}")
            found = {name: tables_of(text)}
        else:
            found = sections_of_readme(text)
        for key, tables in found.items():
            if not tables:
                raise SystemExit(f"no table for {key} in {path}")
            data["tables"][key] = tables
            data["source"][key] = rel
    missing = [n for n in NAMES if n not in data["tables"]]
    if missing:
        raise SystemExit(f"no tables for {', '.join(missing)}")
    with open(DATA, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {os.path.relpath(DATA)}")


# -- drawing -------------------------------------------------------------------


def _num(cell: str) -> float:
    """A figure as printed: ``46,066`` -> 46066.0, ``4.19`` -> 4.19."""
    return float(cell.replace(",", "").split()[0])


def _latency(cell: str) -> tuple[float, float, float]:
    """``158 (104/112)`` -> (req/s, p50 ms, p99 ms)."""
    m = re.match(r"([\d,.]+)\s*\(([\d.]+)/([\d.]+)\)", cell)
    if m is None:
        raise ValueError(f"not 'req/s (p50/p99)': {cell!r}")
    return _num(m.group(1)), float(m.group(2)), float(m.group(3))


def _plain(label: str) -> str:
    return label.replace("`", "").replace("**", "")


def _ours(client: str) -> bool:
    """Is this row txfiberdb itself (the 1.00 every ratio is taken against)?"""
    return "txfiberdb" in client or client.startswith("postgresql+txpostgres")


def _column(header: list[str], *words: str) -> int:
    for i, name in enumerate(header):
        if all(w in name for w in words):
            return i
    raise KeyError(f"no column with {words} in {header}")


def draw(
    data_path: str = DATA, outdir: str = os.path.join(HERE, "_generated")
) -> list[str]:
    """Draw every chart into ``outdir``; return the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(data_path, encoding="utf-8") as f:
        tables = json.load(f)["tables"]
    os.makedirs(outdir, exist_ok=True)
    written = []

    def save(fig: Any, name: str) -> None:
        path = os.path.join(outdir, name)
        fig.tight_layout()
        # No timestamp in the file, so an unchanged chart is an unchanged file.
        fig.savefig(path, dpi=110, metadata={"Software": None})
        plt.close(fig)
        written.append(path)

    # Bridge round trip: µs per round trip, ratio to a bare callback.
    t = tables["fiber"][0]
    h = t["header"]
    styles = [f"{_plain(r[0])} ({r[1]})" for r in t["rows"]]
    ratio = [_num(r[_column(h, "ratio")]) for r in t["rows"]]
    fig, ax = plt.subplots(figsize=(8, 3.4))
    colors = ["#2a7ab0" if "txfiberdb" in s else "#9aa5ad" for s in styles]
    ax.barh(styles[::-1], ratio[::-1], color=colors[::-1])
    ax.axvline(1, color="black", lw=0.8)
    ax.set_xlabel("time per round trip ÷ bare Deferred callback (lower is better)")
    for y, v in enumerate(ratio[::-1]):
        ax.text(v, y, f" {v:.2f}", va="center", fontsize=8)
    save(fig, "bench-fiber.png")

    # HTTP: throughput and latency of each server variant.
    t = tables["web"][0]
    h = t["header"]
    variants = [
        ("txfiberdb", "txfiberdb req/s"),
        ("blocking", "blocking req/s"),
        ("deferToThread", "threads req/s"),
        ("no database", "no-db req/s"),
    ]
    cols = [_column(h, key) for _, key in variants]
    groups = [f"{r[0].strip('`')}\n{r[1]} clients" for r in t["rows"]]
    cells = [[_latency(r[c]) for c in cols] for r in t["rows"]]
    width = 0.2
    palette = ["#2a7ab0", "#d1603d", "#8e6bb8", "#9aa5ad"]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    for j, (label, _) in enumerate(variants):
        xs = [i + (j - 1.5) * width for i in range(len(groups))]
        ax.bar(xs, [c[j][0] for c in cells], width, label=label, color=palette[j])
    ax.set_xticks(range(len(groups)), groups)
    ax.set_yscale("log")
    ax.set_ylabel("requests per second (log scale)")
    ax.legend(fontsize=8, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.22))
    save(fig, "bench-web-throughput.png")

    fig, ax = plt.subplots(figsize=(8, 3.8))
    for j, (label, _) in enumerate(variants):
        xs = [i + (j - 1.5) * width for i in range(len(groups))]
        ax.bar(xs, [c[j][2] for c in cells], width, color=palette[j], alpha=0.45)
        ax.bar(xs, [c[j][1] for c in cells], width, label=label, color=palette[j])
    ax.set_xticks(range(len(groups)), groups)
    ax.set_yscale("log")
    ax.set_ylabel("latency, ms (log scale)\nsolid: median, pale: p99")
    ax.legend(fontsize=8, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.22))
    save(fig, "bench-web-latency.png")

    # Driver and ORM: our throughput divided by each peer's, per setup.
    for name, ratio_words, title_col in (
        ("driver", ("ours q/s",), 0),
        ("orm", ("ours ops/s",), 0),
    ):
        t = tables[name][0]
        h = t["header"]
        rc = _column(h, *ratio_words)
        workloads = list(dict.fromkeys(r[title_col] for r in t["rows"]))
        fig, axes = plt.subplots(
            len(workloads), 1, figsize=(9, 4.2 * len(workloads)), squeeze=False
        )
        for ax, workload in zip(axes[:, 0], workloads, strict=True):
            rows = [r for r in t["rows"] if r[title_col] == workload]
            rows = [r for r in rows if not _ours(r[2])]
            labels = [f"{r[1]}: {_plain(r[2])}" for r in rows]
            values = [_num(r[rc]) for r in rows]
            colors = ["#2a7ab0" if v >= 1 else "#d1603d" for v in values]
            ys = list(range(len(rows)))[::-1]
            ax.barh(ys, values, color=colors)
            ax.set_yticks(ys, labels)
            ax.axvline(1, color="black", lw=0.8)
            ax.set_title(_plain(workload), fontsize=9)
            ax.set_xlabel(
                "txfiberdb's throughput ÷ this client's\n(above 1: txfiberdb ahead)",
                fontsize=8,
            )
            ax.tick_params(axis="y", labelsize=7)
        save(fig, f"bench-{name}.png")
    return written


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] not in ("extract", "draw"):
        print(__doc__)
        return 2
    if argv[1] == "extract":
        extract(argv[2:])
    else:
        for path in draw(
            DATA, argv[2] if len(argv) > 2 else os.path.join(HERE, "_generated")
        ):
            print(f"wrote {os.path.relpath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
