"""Writers: a Report (+ machine info) -> Markdown table, JSON, PNG plot under an output folder."""
from __future__ import annotations

import json
import textwrap
from collections import OrderedDict
from pathlib import Path

from . import machine as machine_mod
from .harness import Report, Row, log2_size


def _3sig(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def fmt_time(s: float | None) -> str:
    if s is None:
        return "fail"
    if s < 1e-3:
        return f"{_3sig(s * 1e6)} µs"
    if s < 1:
        return f"{_3sig(s * 1e3)} ms"
    return f"{_3sig(s)} s"


NOISY = 0.2  # interquartile range above this fraction of the median: the time is marked "±"


def fmt_row_time(r: Row) -> str:
    if r.median_s is None:
        return "fail"
    noisy = r.iqr_s is not None and r.iqr_s > NOISY * r.median_s
    return fmt_time(r.median_s) + (" ±" if noisy else "")


def fmt_ratio(r: float | None) -> str:
    if r is None:
        return "–"
    return f"{r:.2f}×" if r < 10 else f"{r:.0f}×" if r >= 100 else f"{r:.1f}×"


def fmt_err(e: float | None) -> str:
    return "–" if e is None else ("0" if e == 0 else f"{e:.1e}")


def _impl_order(report: Report) -> list[str]:
    """Implementations in the order the benchmark measured them (it lists its subjects first)."""
    return list(OrderedDict((r.impl, None) for r in report.rows))


def _sections(rows: list[Row]) -> "OrderedDict[tuple, list[Row]]":
    out: OrderedDict[tuple, list[Row]] = OrderedDict()
    for r in rows:
        out.setdefault((r.case, r.inputs), []).append(r)
    return out


def markdown(report: Report, machine: dict, wall_s: float | None = None) -> str:
    impls = _impl_order(report)
    subjects = [s for s in report.subjects if s in impls]
    peers = [p for p in report.peers if p in impls and p != report.ceiling]
    with_acc = [i for i in impls if any(r.impl == i and r.accuracy is not None for r in report.rows)]
    lines = [f"# {report.title}", ""]
    lines += machine_mod.markdown(machine)
    if wall_s is not None:
        lines.append(f"- wall time of this run: {wall_s:.0f} s")
    if report.config.get("loadavg_end"):
        lines.append(f"- load average (1, 5, 15 min) at the start {machine.get('loadavg')}, at the end "
                     f"{report.config['loadavg_end']} (this machine is shared: compare ratios within a run)")
    lines.append("")
    notes = [*report.notes, f"A time marked ± had an interquartile range above {NOISY:.0%} of its median (noisy)."]
    lines += [f"- {n}" for n in notes] + [""]
    header = ["dtype", "size", *(f"{i}" for i in impls)]
    for s in subjects:
        header.append(f"{s} GB/s")
        if report.ceiling:
            header.append(f"{s} % of {report.ceiling}")
        header += [f"{s} vs {p}" for p in peers]
    extra_cols = [(k, i) for k in report.extra_columns for i in impls
                  if any(r.impl == i and k in r.extra for r in report.rows)]
    header += [f"{k} {i}" for k, i in extra_cols]
    header += [f"err {i}" for i in with_acc]
    for (case, inputs), rows in _sections(report.rows).items():
        lines += [f"## {case} — {inputs}", "", "| " + " | ".join(header) + " |",
                  "|" + "|".join("---:" if i > 1 else "---" for i in range(len(header))) + "|"]
        keys = OrderedDict(((r.dtype, r.size), None) for r in rows)
        for dtype, size in keys:
            by_impl = {r.impl: r for r in rows if r.dtype == dtype and r.size == size}
            cells = [dtype, log2_size(size)]
            cells += [fmt_row_time(by_impl[i]) if i in by_impl else "–" for i in impls]
            for s in subjects:
                r = by_impl.get(s)
                cells.append(f"{r.gbps:.1f}" if r is not None and r.gbps else "–")
                if report.ceiling:
                    c = r.ratios.get(report.ceiling) if r is not None else None
                    cells.append(f"{100 * c:.0f} %" if c is not None else "–")
                cells += [fmt_ratio(r.ratios.get(p)) if r is not None else "–" for p in peers]
            cells += [str(by_impl[i].extra.get(k, "–")) if i in by_impl else "–" for k, i in extra_cols]
            cells += [fmt_err(by_impl[i].accuracy) if i in by_impl else "–" for i in with_acc]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    errors = [r for r in report.rows if r.error]
    if errors:
        lines += ["## Failures", ""]
        lines += [f"- {r.case} / {r.inputs} / {r.dtype} / {log2_size(r.size)} / {r.impl}: {r.error}" for r in errors]
        lines.append("")
    return "\n".join(lines)


def write_json(report: Report, machine: dict, path: Path, wall_s: float | None) -> None:
    doc = {"op": report.op, "title": report.title, "machine": machine, "wall_s": wall_s, "config": report.config,
           "notes": report.notes, "subjects": report.subjects, "peers": report.peers, "ceiling": report.ceiling,
           "rows": [r.to_dict() for r in report.rows]}
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")


def write_plot(report: Report, machine: dict, path: Path) -> None:
    """GB/s against size, one panel per (case, inputs) x dtype, one line per implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    impls = _impl_order(report)
    rows = [r for r in report.rows if r.median_s and r.gbps]
    sections = list(_sections(rows))
    dtypes = list(OrderedDict((r.dtype, None) for r in rows))
    if not sections or not dtypes:
        return
    nr, nc = len(sections), len(dtypes)
    head_in = 0.9  # inches reserved above the panels for the title and the legend
    fig, axes = plt.subplots(nr, nc, figsize=(4.2 * nc, 2.8 * nr + head_in), squeeze=False, sharex=True)
    colors = {i: f"C{k}" for k, i in enumerate(impls)}
    for a, (case, inputs) in enumerate(sections):
        for b, dtype in enumerate(dtypes):
            ax = axes[a][b]
            for impl in impls:
                pts = sorted((r.size, r.gbps) for r in rows
                             if r.impl == impl and r.dtype == dtype and (r.case, r.inputs) == (case, inputs))
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, color=colors[impl],
                            label=impl, linestyle="--" if impl == report.ceiling else "-",
                            linewidth=2.2 if impl in report.subjects else 1.2)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{case}, {inputs.split(':')[0]}, {dtype}", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(True, which="both", alpha=0.3)
            if b == 0:
                ax.set_ylabel("GB/s (compulsory bytes)", fontsize=7)
            if a == nr - 1:
                ax.set_xlabel("elements", fontsize=7)
    handles, labels = axes[0][0].get_legend_handles_labels()
    height = 2.8 * nr + head_in
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 1 - 0.5 / height), fontsize=8,
               ncol=len(labels), frameon=False)
    dev = machine["gpu"]["name"] if machine.get("gpu") else f"{machine['cpu']}, {machine['torch_threads']} threads"
    width = int(4.2 * nc * 14)  # characters of 7.5 pt text across the figure
    title = "\n".join(textwrap.shorten(t, width=width, placeholder=" …") for t in (
        f"{report.title} — {dev}", machine_mod.kernel_commit_line(machine)))
    fig.suptitle(title, fontsize=7.5, y=1 - 0.05 / height, va="top")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.7 * head_in / height))
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_all(report: Report, machine: dict, out_dir: Path, stem: str, wall_s: float | None = None) -> dict:
    """Writes <stem>.md, <stem>.json and <stem>.png into ``out_dir``; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"md": out_dir / f"{stem}.md", "json": out_dir / f"{stem}.json", "png": out_dir / f"{stem}.png"}
    paths["md"].write_text(markdown(report, machine, wall_s) + "\n")
    write_json(report, machine, paths["json"], wall_s)
    write_plot(report, machine, paths["png"])
    return paths


