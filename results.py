"""results: a grid's table from its finished runs, beside the paper's values: results_<grid>.md
(printed), .csv (full precision) and .png (a panel per cell, a bar per variant). The rule is the
paper's: per return target, the mean over seeds of each seed's last-20% mean (summary.json's
`last20`); a line is the best target's mean ± std over the seeds present (population std, ddof=0).
A line with no finished seed is "—", never 0. Runs given lamo.py flags after -- (the sweep's
sweep.json) that change what they train (a setting's value, not how long, where or how they are
evaluated: lamo.NOT_THE_METHOD, the rule of a run's own summary.json) were trained with other
settings than the paper's: no paper value stands beside them.
"""
from __future__ import annotations

import csv
import json
import shlex
from pathlib import Path

import numpy as np

import lamo
from grids import GRIDS, VARIANTS, Cell, Entry, Run, make_cell
from tasks import PAPER_FIGURES, PAPER_TABLES


def cell_result(summaries: list[dict]) -> dict | None:
    """The paper's rule for one cell, from the summary.json of each seed present: per target, the
    mean over seeds of each seed's last-20% mean; the cell is the best target's mean and its
    population std (ddof=0) over the seeds. None if no seed is present."""
    if not summaries:
        return None
    # Targets high to low, so a tie goes to the higher one, the same way every time.
    targets = sorted(set.intersection(*(set(s["targets"]) for s in summaries)), key=float,
                     reverse=True)
    if not targets:
        return None
    per_target = {t: [s["targets"][t]["last20"] for s in summaries] for t in targets}
    means = {t: float(np.mean(scores)) for t, scores in per_target.items()}
    best = max(targets, key=means.get)
    return {"target": best, "mean": means[best], "std": float(np.std(per_target[best])),
            "target_means": means}


def read_summary(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):     # not finished, or being written
        return None


def paper_value(grid: str | None, entry: Entry) -> tuple | None:
    """(mean, std or None, source, approximate) of the paper for one line of a table. A grid
    compares with its own table or figure only, so a figure's ≈ values never stand beside a
    table's exact ones. A sweep without --grid takes the first of the paper's tables (never a
    figure) with a line on this task and ratio whose run is this very run, the same model and
    flags (grids.make_cell in the grid): --model lamo-gpt2-medium on Kitchen Complete 30% is
    Table 1's LaMo, and --model lamo there (GPT-2 small) is no line of the paper."""
    cell = entry.cell
    if grid is not None and GRIDS[grid] in PAPER_FIGURES:
        mean = PAPER_FIGURES[GRIDS[grid]].get((cell.task, cell.frac), {}).get(entry.variant)
        return None if mean is None else (mean, None, GRIDS[grid], True)
    if grid is not None:
        score = PAPER_TABLES[GRIDS[grid]].get((cell.task, cell.frac), {}).get(entry.variant)
        return None if score is None else (*score, GRIDS[grid], False)
    for source, lines in PAPER_TABLES.items():
        for variant, score in lines.get((cell.task, cell.frac), {}).items():
            if make_cell(cell.task, cell.frac, variant, in_grid=True) == cell:
                return (*score, source, False)
    return None


def sweep_flags(sweep_dir: Path) -> list[str]:
    """The lamo.py flags after -- that every run of the sweep was given (sweep.json); none for a
    folder without one (runs gathered by hand)."""
    saved = sweep_dir / "sweep.json"
    return json.loads(saved.read_text())["lamo_flags"] if saved.exists() else []


def changes_the_method(cell: Cell, lamo_flags: list[str]) -> bool:
    """Whether the flags after -- change what the cell's runs train: its config resolved with
    them differs from the one without in a field other than lamo.NOT_THE_METHOD's (how long,
    where, how evaluated), the rule of a run's own summary.json (lamo.paper_reference). So
    --steps or --compile keep the paper's value, and --lm-coef 0 on MuJoCo (its default) too."""
    if not lamo_flags:
        return False
    argv = ["--env", cell.task, "--frac", str(cell.frac), "--model", cell.model, *cell.flags]
    plain = lamo.resolve(*lamo.parse_args(argv))
    try:
        given = lamo.resolve(*lamo.parse_args(argv + lamo_flags))
    except lamo.LamoError:          # flags this cell refuses (--lora-rank for DT): not its run
        return True
    return bool(lamo.method_differences(plain, given))


def table_rows(grid: str | None, entries: list[Entry], seeds, sweep_dir: Path) -> list[dict]:
    """A row per line. Runs given flags after -- (sweep.json) that change what they train are not
    the paper's runs: their flags column says so, and they get no paper value."""
    lamo_flags = sweep_flags(sweep_dir)
    rows = []
    for entry in entries:
        cell = entry.cell
        other = changes_the_method(cell, lamo_flags)
        summaries = [read_summary(sweep_dir / Run(cell, seed).name) for seed in seeds]
        present = [s for s in summaries if s is not None]
        ours = cell_result(present) or {"target": None, "mean": None, "std": None,
                                        "target_means": {}}
        paper = None if other else paper_value(grid, entry)
        rows.append({"task": cell.task, "ratio": cell.frac, "variant": entry.variant,
                     "model": cell.model, "flags": shlex.join([*cell.flags, *lamo_flags]),
                     "run": cell.name, "seeds": len(present), "seeds_expected": len(seeds),
                     **ours, "other_settings": other,
                     **dict(zip(("paper_mean", "paper_std", "paper_table", "paper_approx"),
                                paper or (None, None, None, False)))})
    return rows


def pm(mean, std) -> str:
    """mean ± std; the mean alone where the paper gives no std; — where there is no value."""
    if mean is None:
        return "—"
    return f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"


def paper_text(r: dict) -> str:
    if r["paper_mean"] is None:
        return "—"
    if r["paper_approx"]:
        return f"≈ {r['paper_mean']:g} ({r['paper_table']})"
    return f"{pm(r['paper_mean'], r['paper_std'])} ({r['paper_table']})"


def label(variant: str) -> str:
    return VARIANTS[variant].label


def markdown(rows: list[dict], name: str, grid: str | None) -> str:
    """A line per (task, ratio, variant); a grid of more than two variants (Tables 15 and 16, the
    figures) first gets them side by side, a column per variant, as the paper lays them out."""
    what = "" if grid is None else f", grid `{grid}` (the paper's {GRIDS[grid]})"
    lines = [f"Sweep `{name}`{what}: normalised score.", ""]
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    if len(variants) > 2:
        by_cell = {}
        for r in rows:
            by_cell.setdefault((r["task"], r["ratio"]), {})[r["variant"]] = r
        lines += ["Side by side, ours / paper:", "",
                  "| task | ratio | " + " | ".join(map(label, variants)) + " |",
                  "| --- | ---: |" + " ---: |" * len(variants)]
        for (task, ratio), line in by_cell.items():
            values = [f"{pm(r['mean'], r['std'])} / {paper_text(r).rsplit(' (', 1)[0]}"
                      if r else "" for r in map(line.get, variants)]
            lines.append(f"| {task} | {ratio:g} | " + " | ".join(values) + " |")
        lines.append("")
    lines += ["| task | ratio | variant | ours | paper | target | seeds | lamo.py flags |",
              "| --- | ---: | --- | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['ratio']:g} | {label(r['variant'])} "
                     f"| {pm(r['mean'], r['std'])} | {paper_text(r)} | {r['target'] or '—'} "
                     f"| {r['seeds']}/{r['seeds_expected']} | {r['flags'] or 'defaults'} |")
    lines += ["", "ours: for the best return target, the mean ± std (population, ddof=0) over the "
              "seeds present of each seed's mean score over its evaluations in the last 20% of "
              "training; the best target is the one with the highest mean over seeds. paper: "
              "Shi et al., ICLR 2024, over 3 seeds. —: no finished seed (or no paper value). "
              "lamo.py flags: what the run adds to the task's defaults (tasks.py)."]
    if any(r["other_settings"] for r in rows):
        lines += ["", "paper: — on a line whose runs the lamo.py flags after `--` (sweep.json; "
                  "in the flags column) change what they train: they were trained with other "
                  "settings than the paper's and are not compared with its numbers."]
    if any(r["paper_approx"] for r in rows):
        lines += ["", f"≈ read from the paper's figure ({GRIDS[grid]}): means read off its bars "
                  "(± 2-5 points), not printed numbers and never mixed with the tables' exact "
                  "values (e.g. Breakout 10%: ≈185 in Figs. 4 and 5, 136.9 in Table 2)."]
    if any(r["paper_std"] is None and r["paper_mean"] is not None and not r["paper_approx"]
           for r in rows):
        lines += ["", "A paper value without ± has no std: Table 9's DT (copied from IQL's paper) "
                  "and Table 16's w/o pre-training (its std was not transcribed; see the paper)."]
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict], path: Path):
    """Full-precision numbers; empty fields where a value is missing. paper_approx: 1 for a value
    read from the paper's figure."""
    columns = ["task", "ratio", "variant", "model", "flags", "run", "seeds", "seeds_expected",
               "target", "mean", "std", "paper_mean", "paper_std", "paper_table", "paper_approx",
               "target_means"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        for r in rows:
            means = ";".join(f"{t}:{m!r}" for t, m in r["target_means"].items())
            writer.writerow({**{k: "" if r[k] is None else r[k] for k in columns[:-1]},
                             "paper_approx": int(r["paper_approx"]), "target_means": means})


def plot(rows: list[dict], path: Path, title: str):
    """Laid out like the paper's figures: a panel per (task, ratio), its own y scale, a bar per
    variant (ours: mean ± std over seeds; a cell with no finished seed says so, not 0) and the
    paper's value as a black marker on it, right of centre: filled, with the paper's ± std, for a
    table; hollow for a value read from a figure."""
    import matplotlib                     # imported here: only the table step pays for it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    panels = list(dict.fromkeys((r["task"], r["ratio"]) for r in rows))
    by_line = {(r["task"], r["ratio"], r["variant"]): r for r in rows}
    colors = {v: "0.6" if v == "dt" else plt.get_cmap("tab10")(i) for i, v in enumerate(variants)}
    ncols = min(4, len(panels))
    nrows = -(-len(panels) // ncols)
    # constrained layout: the title above and the legend below get the room they need
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.9 * ncols + 0.6, 2.4 * nrows + 1.0),
                             squeeze=False, layout="constrained")
    for ax, (task, ratio) in zip(axes.flat, panels):
        for i, variant in enumerate(variants):
            r = by_line.get((task, ratio, variant))
            if r is None:
                continue
            if r["mean"] is None:
                ax.text(i, 0, "no run", rotation=90, ha="center", va="bottom", fontsize=8,
                        color="0.4")
            else:
                ax.bar(i, r["mean"], 0.75, yerr=r["std"], capsize=3, color=colors[variant],
                       error_kw={"lw": 1, "ecolor": "0.2"})
                if r["seeds"] < r["seeds_expected"]:
                    ax.annotate(f"{r['seeds']}/{r['seeds_expected']} seeds", (i, 0), ha="center",
                                va="bottom", fontsize=7, color="w")
            if r["paper_mean"] is not None:
                # beside the bar's centre, so its ± std stays apart from ours
                ax.errorbar(i + 0.2, r["paper_mean"], yerr=r["paper_std"], fmt="D", ms=5, color="k",
                            mfc="w" if r["paper_approx"] else "k", capsize=4, lw=1)
        ax.set_title(f"{task.removesuffix('-v2')} {100 * ratio:g}%", fontsize=9)
        ax.set_xticks([])
        ax.set_xlim(-0.6, len(variants) - 0.4)
        ax.axhline(0, color="0.5", lw=0.6)
        ax.tick_params(labelsize=8)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    approx = any(r["paper_approx"] for r in rows)
    handles = [Patch(color=colors[v], label=f"{label(v)} (ours)") for v in variants]
    handles.append(Line2D([], [], marker="D", ls="", color="k", mfc="w" if approx else "k",
                          label="paper: ≈ read from the paper's figure" if approx
                          else "paper (table value ± std)"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 3),
               fontsize=8, frameon=False)
    fig.suptitle(f"{title}\nbars: ours, mean ± std over seeds; diamonds: the paper", fontsize=10)
    fig.supylabel("normalised score", fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_tables(tables: dict[str | None, list[Entry]], seeds, sweep_dir: Path):
    """Per grid, results_<grid>.md/.csv/.png (a sweep without --grid: results.*), so the grids
    sharing a folder of runs keep their tables apart."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    for grid, entries in tables.items():
        stem = "results" if grid is None else f"results_{grid}"
        rows = table_rows(grid, entries, seeds, sweep_dir)
        text = markdown(rows, sweep_dir.name, grid)
        (sweep_dir / f"{stem}.md").write_text(text)
        write_csv(rows, sweep_dir / f"{stem}.csv")
        source = "" if grid is None else f", {grid}: the paper's {GRIDS[grid]}"
        plot(rows, sweep_dir / f"{stem}.png", f"sweep {sweep_dir.name}{source}")
        print(f"\n{text}\nwrote {sweep_dir}/{stem}.md, {stem}.csv, {stem}.png")
