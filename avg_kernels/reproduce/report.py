"""A study's record: the Markdown table (mean ± SEM over seeds), the JSON of every run, the PNG of the full
training loss against samples seen and against training wall time, with the command, commit and machine."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch


def machine() -> dict:
    """The machine/source record of the bench tables (``avg_kernels._machine``). The command is written as typed (``python -m avg_kernels reproduce ...``)."""
    m = _machine()
    if sys.argv and sys.argv[0].endswith(os.path.join("avg_kernels", "__main__.py")):
        m["command"] = "python -m avg_kernels " + " ".join(sys.argv[1:])
    return m


def _machine() -> dict:
    from .._machine import machine_info

    return machine_info()


def machine_lines(m: dict) -> list[str]:
    src = m.get("source", {})
    dirty = ", with uncommitted changes" if src.get("tree_dirty") else ""
    load = f"; load average {m['loadavg']}" if m.get("loadavg") else ""
    gpu = m.get("gpu")
    return [f"- command: `{m['command']}`",
            f"- commit {src.get('head')} ({src.get('branch', '?')}){dirty}; measured {m['date_utc']} UTC",
            f"- {m.get('cpu')}, {m.get('cpus_usable')} usable CPUs, torch threads {m.get('torch_threads')}{load}; "
            + (f"GPU {gpu['name']}" if gpu else "no GPU") + f"; torch {m.get('torch')}, Python {m.get('python')}"]


def _pm(m, s, fmt="{:.4g}") -> str:
    if m is None:
        return "–"
    return fmt.format(m) + ("" if s is None else " ± " + fmt.format(s))


def _opt(v, fmt="{:.3g}") -> str:
    return "–" if v is None else fmt.format(v)


COLUMNS = [  # (header, cell(method entry) -> str, shown when any cell is not "–")
    ("final train loss", lambda a: _pm(a["final_loss"], a["final_loss_sem"])),
    ("best train loss", lambda a: _pm(a["best_loss"], a["best_loss_sem"])),
    ("train loss at 10 % of the steps", lambda a: _pm(a.get("early_loss"), a.get("early_loss_sem"))),
    ("test acc", lambda a: _pm(a["test_acc"], a["test_acc_sem"], "{:.3f}")),
    ("diverged", lambda a: f"{a['diverged']}/{a['seeds']}" if a["diverged"] else "–"),
    ("rel. sample eff. vs base", lambda a: _opt(a.get("rel_sample_eff"), "{:.2f}")),
    ("epochs to base's best (base's)", lambda a: "–" if "base_best" not in a else
        f"{_opt(a['epochs_to_base_best'], '{:.3g}') if a['epochs_to_base_best'] is not None else 'never'} "
        f"({_opt(a['base_epochs_to_base_best'], '{:.3g}')})"),
    ("train s to base's best (base's)", lambda a: "–" if "base_best" not in a else
        f"{_opt(a['s_to_base_best'], '{:.3g}') if a['s_to_base_best'] is not None else 'never'} "
        f"({_opt(a['base_s_to_base_best'], '{:.3g}')})"),
    ("RD (batch-loss gain at matched step)", lambda a: _pm(a["RD"], a["RD_sem"], "{:.3g}")),
    ("step L1 vs base", lambda a: _opt(a.get("step_l1_vs_base"), "{:.3f}")),
    ("ms/step (median)", lambda a: _opt(a["step_ms"], "{:.3g}")),
]


def table(setting: dict) -> list[str]:
    """Markdown table of one setting's methods."""
    entries = setting["methods"]
    cols = [(h, f) for h, f in COLUMNS if any("agg" in e and f(e["agg"]) != "–" for e in entries)]
    head = ["method", "base", "lr", *(h for h, _ in cols)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in entries:
        if "agg" not in e:
            lines.append(f"| {e['method']} | {e['base'] or '–'} | – | " + " | ".join(
                ["not run"] + ["–"] * (len(cols) - 1)) + " |")
            continue
        lines.append(f"| {e['method']} | {e['base'] or '–'} | {e['lr']:g} | "
                     + " | ".join(f(e["agg"]) for _, f in cols) + " |")
    return lines


def markdown(doc: dict) -> str:
    lines = [f"# {doc['title']}", "", *machine_lines(doc["machine"]),
             f"- preset `{doc['preset']}`, data {doc['data']} ({doc['n_train']} training images), seeds {doc['seeds']}, "
             f"{doc['budget']['epochs']} epochs of batch {doc['budget']['batch']}, full-train loss at "
             f"{doc['budget']['evals']} evenly spaced points; this run took {doc['wall_s']:.0f} s wall, "
             f"{doc.get('cpu_s', float('nan')):.0f} s CPU",
             f"- paper: {doc['paper']}", ""]
    lines += [f"- {n}" for n in doc["notes"]]
    lines += ["", "Mean ± SEM over seeds. Columns: final/best = full training set cross-entropy at the end / the "
              "smallest over the run; rel. sample eff. = paper 002 §4.1(a) against the base method, over the "
              "evaluation points; epochs (training seconds) until the seeds' mean loss reaches the base's best mean "
              "loss (training seconds: CPU time of the steps on a CPU device, wall time on a GPU); RD = (Σ r_AG − Σ r_base)/|Σ r_base| on the same batches and parameters (AG's step has the base "
              "step's L1 length); step L1 vs base = mean ‖Δθ‖₁ against the base method's own run.", ""]
    for s in doc["settings"]:
        lines += [f"## {s['title']}", "", *table(s), ""]
        if s.get("rates_note"):
            lines += [f"Note: {s['rates_note']}", ""]
    if doc.get("plot"):
        lines += [f"![loss curves]({doc['plot']})", ""]
    return "\n".join(lines)


def plot(doc: dict, path: Path) -> None:
    """One row per setting: full-train loss (log) against samples seen and against training wall time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = doc["settings"]
    fig, axes = plt.subplots(len(settings), 2, figsize=(11, 3.6 * len(settings) + 0.6), squeeze=False)
    for row, s in zip(axes, settings):
        for k, e in enumerate(m for m in s["methods"] if "runs" in m):
            runs = e["runs"]
            n = min(len(r["evals"]) for r in runs)
            if n == 0:
                continue
            t = torch.tensor([[r["evals"][j]["train_loss"] for j in range(n)] for r in runs], dtype=torch.float64)
            mean = t.mean(0)
            sem = t.std(0) / len(runs) ** 0.5 if len(runs) > 1 else torch.zeros_like(mean)
            x_samples = [runs[0]["evals"][j]["samples"] for j in range(n)]
            x_wall = [sum(r["evals"][j]["wall_s"] for r in runs) / len(runs) for j in range(n)]
            style = dict(color=f"C{k % 10}", ls="--" if e["method"] != e.get("base") and e.get("base") else "-")
            for ax, x in ((row[0], x_samples), (row[1], x_wall)):
                ax.plot(x, mean.tolist(), label=f"{e['method']} (lr {e['lr']:g})", **style)
                ax.fill_between(x, (mean - sem).clamp_min(1e-6).tolist(), (mean + sem).tolist(), color=style["color"],
                                alpha=0.15)
        row[0].set_xlabel("samples seen")
        row[1].set_xlabel("training time (s): " + ("CPU time of the steps, 1 thread" if doc.get("device", "cpu") == "cpu"
                                                  else "wall time"))
        for ax in row:
            ax.set_yscale("log")
            ax.set_ylabel("full training loss")
            ax.grid(alpha=0.3)
        row[0].set_title(s["title"][:90], fontsize=8, loc="left")
        row[1].legend(fontsize=7)
    fig.suptitle(f"{doc['title'][:110]} — {doc['preset']}, {doc['data']}, {len(doc['seeds'])} seeds (mean ± SEM)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def rerender(json_path: Path) -> list[Path]:
    """Recomputes the aggregates of a written record from its runs and rewrites its .md/.png (the runs, the
    command and the machine stay those of the run)."""
    from .engine import aggregate

    doc = json.loads(Path(json_path).read_text())
    for s in doc["settings"]:
        by = {e["method"]: e for e in s["methods"]}
        for e in s["methods"]:
            if "runs" in e:
                base = by.get(e["base"]) if e["base"] else None
                e["agg"] = aggregate(e["runs"], base.get("runs") if base else None, doc["n_train"])
    return write(doc, Path(json_path).parent, Path(json_path).stem)


def write(doc: dict, out: Path, stem: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    png, md, js = out / f"{stem}.png", out / f"{stem}.md", out / f"{stem}.json"
    if any("runs" in e for s in doc["settings"] for e in s["methods"]):
        plot(doc, png)
        doc["plot"] = png.name
    md.write_text(markdown(doc) + "\n")
    js.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    return [p for p in (md, js, png) if p.exists()]


def tune_markdown(doc: dict) -> str:
    lines = [f"# {doc['title']}: learning-rate grids", "", *machine_lines(doc["machine"]),
             f"- preset `{doc['preset']}` budget, data {doc['data']}, seeds {doc['seeds']}; criterion: the seeds' mean "
             "of the smallest full-train loss over the run (paper 000); a diverged run counts as +inf", ""]
    for s in doc["settings"]:
        lines += [f"## {s['title']}", "", "| rate key | method | lr: mean best loss | chosen |", "|---|---|---|---|"]
        for key, g in s["grids"].items():
            cells = "; ".join(f"{r['lr']:g}: {r['best_loss']:.4g}" for r in g["rows"])
            lines.append(f"| {key} | {g['method']} | {cells} | {g['chosen']:g}"
                         + (" (at the grid's edge)" if g["at_grid_edge"] else "") + " |")
        lines.append("")
    return "\n".join(lines)
