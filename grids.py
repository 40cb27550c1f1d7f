"""grids: which runs a table of the paper needs. A grid is the cells (task, data ratio) and the
columns (variants) of one of the paper's tables or figures, read from paper.py; each line of it is
filled by one cell, a run folder per seed, named by the lamo.py flags it adds to the task's
defaults, so a run that two grids ask for is one folder, trained once. sweep.py runs a grid;
results.py makes its table.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from difflib import get_close_matches

from lamo import PRESETS
from tasks import PAPER_FIGURES, PAPER_SETTINGS, PAPER_TABLES, TASKS

MODELS = ("lamo", "dt")                    # the paper's two models; --model's default
SEEDS = (0, 1, 2)                          # the paper's three seeds per cell
PAPER_GRID = "paper"                       # --grid paper: every grid below, each run once
# --grid -> the paper's table or figure (paper.py) whose cells and variants it runs.
GRIDS = {"table1": "Table 1", "table2": "Table 2", "table3": "Table 3",
         "table8": "Table 8", "table9": "Table 9", "table10": "Table 10", "table11": "Table 11",
         "table15": "Table 15", "table16": "Table 16",
         "fig4": "Fig. 4", "fig5": "Fig. 5", "fig6": "Fig. 6", "fig10": "Fig. 10"}


class SweepError(Exception):
    """Bad input: printed as one `error: ...` line, exit status 2."""


@dataclass(frozen=True)
class Variant:
    """A column of the paper's tables and figures: lamo.py's --model, and the settings (Config
    fields) it changes from that model's defaults on the task."""
    model: str
    label: str
    settings: tuple[tuple[str, object], ...] = ()


VARIANTS = {
    "lamo": Variant("lamo", "LaMo"),
    "dt": Variant("dt", "DT"),
    "lamo-linear": Variant("lamo", "LaMo, linear embeddings", (("embed", "linear"),)),
    "lamo-full": Variant("lamo", "LaMo, full fine-tuning", (("finetune", "full"),)),
    "lamo-frozen": Variant("lamo", "LaMo, frozen (no LoRA)", (("finetune", "frozen"),)),
    "lamo-lm": Variant("lamo", "LaMo, λ 0.1", (("lm_coef", 0.1),)),
    "lamo-nolm": Variant("lamo", "LaMo, λ 0", (("lm_coef", 0.0),)),
    # On hopper it keeps the task's linear embeddings, as LaMo there does (run_hopper.sh drops
    # --mlp_embedding; the paper's "random GPT-2 + LoRA + MLP" is the other tasks' recipe): an
    # ablation changes one thing from the LaMo it is compared with.
    "lamo-nopt": Variant("lamo", "LaMo w/o pre-training", (("pretrained", "none"),)),
    "lamo-gpt2": Variant("lamo", "LaMo, GPT-2 small", (("pretrained", "gpt2"),)),
    "lamo-gpt2-medium": Variant("lamo", "LaMo, GPT-2 medium", (("pretrained", "gpt2-medium"),)),
}
# Cells whose LaMo the paper ran on more than the defaults (paper.PAPER_SETTINGS): GPT-2 medium for
# Kitchen Complete 30% and Partial 100% (Table 1). In a paper grid every LaMo variant of such a
# cell keeps it unless the variant sets --pretrained itself (Fig. 10's sizes, Table 15's w/o
# pre-training), so an ablation changes one thing from the LaMo it is compared with (Fig. 6's λ 0
# on Complete 30% is GPT-2 medium).
CELL_SETTINGS = PAPER_SETTINGS


@dataclass(frozen=True)
class Cell:
    """What one run folder per seed holds: a task, a data ratio, a model and the lamo.py flags it
    adds to the task's defaults. Its name says all of them, so the same run asked for by two grids
    (or two variants that resolve to the same flags) is one folder."""
    task: str
    frac: float
    model: str
    flags: tuple[str, ...] = ()       # --flag value pairs

    @property
    def name(self) -> str:
        pairs = zip(self.flags[::2], self.flags[1::2])
        return f"{self.task}_f{self.frac:g}_{self.model}" + "".join(
            f"+{flag.removeprefix('--')}={value}" for flag, value in pairs)


@dataclass(frozen=True)
class Entry:
    """A line of a grid's table: the paper's (task, ratio, variant) and the cell that fills it."""
    variant: str
    cell: Cell


@dataclass(frozen=True)
class Run:
    cell: Cell
    seed: int

    @property
    def name(self) -> str:
        return f"{self.cell.name}_s{self.seed}"


def task_defaults(task: str, model: str) -> dict:
    """What lamo.py's resolve() fills in for this task and model: the task's recipe, then the
    model's preset."""
    if task not in TASKS:
        raise SweepError(f"--env {task!r}: not a task of tasks.py, whose defaults a variant's "
                         f"settings are compared with; known: {', '.join(TASKS)}")
    return {**asdict(getattr(TASKS[task], model)), **PRESETS[model]}


def make_cell(task: str, frac: float, variant: str, in_grid: bool) -> Cell:
    """The cell of a variant on (task, ratio). A setting equal to the task's default gives no flag,
    so a variant that is the default run on this task (Fig. 6's λ 0.1 on Kitchen, Fig. 10's GPT-2
    small) is the very run of the main tables, trained once. Flags are sorted by name, so the
    same settings always name the same folder."""
    v = VARIANTS[variant]
    settings = dict(v.settings)
    if in_grid and v.model == "lamo":
        settings = {**dict(CELL_SETTINGS.get((task, frac), ())), **settings}
    if settings:    # only a variant with settings needs the task's entry in tasks.py
        defaults = task_defaults(task, v.model)
        settings = {k: value for k, value in settings.items() if value != defaults[k]}
    flags = []
    for key, value in sorted(settings.items()):
        flags += [f"--{key.replace('_', '-')}", f"{value:g}" if isinstance(value, float) else value]
    return Cell(task, frac, v.model, tuple(flags))


def grid_variants(source: str) -> list[str]:
    """A table's or figure's variants, in the paper's order: the keys of its cells."""
    book = PAPER_FIGURES if source in PAPER_FIGURES else PAPER_TABLES
    return list(dict.fromkeys(v for scores in book[source].values() for v in scores))


def grid_entries(grid: str | None, envs, fracs, variants) -> dict[str | None, list[Entry]]:
    """--grid: {grid: its (task, ratio, variant) entries}, the paper's cells narrowed by --env,
    --frac and --model (variant names) if given, each value of which must select an entry
    (check_selected); --grid paper: every grid that keeps an entry. Without --grid: {None: every
    --env x --frac x --model (default: LaMo and DT)}."""
    for v in variants or ():
        if v not in VARIANTS:
            raise SweepError(f"--model {v!r}: choose among {', '.join(VARIANTS)}")
    if grid is None:
        if not envs or not fracs:
            raise SweepError(f"give --grid ({' | '.join([*GRIDS, PAPER_GRID])}), "
                             "or --env and --frac")
        entries = [Entry(v, make_cell(env, frac, v, in_grid=False))
                   for env in envs for frac in fracs for v in variants or MODELS]
        return {None: list(dict.fromkeys(entries))}     # --frac 0.1 0.1 is one cell, not two
    if grid != PAPER_GRID and grid not in GRIDS:
        raise SweepError(f"--grid {grid!r}: choose one of {', '.join([*GRIDS, PAPER_GRID])}")
    tables, lines = {}, []
    for name in GRIDS if grid == PAPER_GRID else [grid]:
        book = PAPER_FIGURES if GRIDS[name] in PAPER_FIGURES else PAPER_TABLES
        lines += [(task, frac, v) for (task, frac), scores in book[GRIDS[name]].items()
                  for v in scores]
        entries = [Entry(v, make_cell(task, frac, v, in_grid=True))
                   for (task, frac), scores in book[GRIDS[name]].items()
                   if (not envs or task in envs) and (not fracs or frac in fracs)
                   for v in scores if not variants or v in variants]
        if entries:
            tables[name] = entries
    check_selected(grid, tables, lines, envs, fracs, variants)
    return tables


def check_selected(grid: str, tables: dict[str, list[Entry]], lines: list[tuple], envs, fracs,
                   variants):
    """Each --env, --frac and --model value given must select an entry of the grid: a typo
    (hoper-medium-v2) or a value the grid lacks is an error naming it, never a grid quietly
    narrowed to the other values. lines: the grid's (task, ratio, variant) lines."""
    chosen = [(e.cell.task, e.cell.frac, e.variant) for es in tables.values() for e in es]
    unknown = []
    for i, (flag, values) in enumerate([("--env", envs), ("--frac", fracs),
                                        ("--model", variants)]):
        known = list(dict.fromkeys(line[i] for line in lines))
        for value in dict.fromkeys(values or ()):
            if any(line[i] == value for line in chosen):
                continue
            if value in known:
                hint = "not with the other --env/--frac/--model values given"
            elif flag == "--env":
                close = get_close_matches(value, known, n=2)
                hint = (f"did you mean {' or '.join(close)}?" if close
                        else f"its tasks: {', '.join(known)}")
            elif flag == "--frac":
                hint = f"its ratios: {', '.join(f'{f:g}' for f in sorted(known))}"
            else:
                hint = f"its variants: {', '.join(known)}"
            unknown.append(f"{flag} {value:g} ({hint})" if flag == "--frac"
                           else f"{flag} {value} ({hint})")
    if unknown:
        raise SweepError(f"no cell of --grid {grid} has {'; nor '.join(unknown)}")


def grid_cells(tables: dict[str | None, list[Entry]]) -> list[Cell]:
    """Every cell of the grids, once: a run two grids share is trained once."""
    return list(dict.fromkeys(e.cell for entries in tables.values() for e in entries))


def make_runs(cells: list[Cell], seeds) -> list[Run]:
    """Seed-major order: a sweep cut short leaves every cell with its first seeds, not a few
    cells complete and the rest empty."""
    return [Run(cell, seed) for seed in dict.fromkeys(seeds) for cell in cells]
