"""The paper's numbers (Shi et al., ICLR 2024), published, not measured by us; REFERENCE.md §2 and
§10 (../shared/ beside the repository) list where each comes from. No project imports: tasks.py
re-exports these, and runs.py and results.py compare their results with them.

Two kinds, kept apart on purpose:
- PAPER_TABLES: exact numbers printed in the paper's tables, (mean, std) over 3 seeds; std None
  where the paper gives none (Table 9's DT) or it was not transcribed (Table 16's w/o PT).
- PAPER_FIGURES: values read off the paper's bar plots (≈, the final segment of each bar, ± 2-5
  points), means only. They are never mixed with the tables: where a figure and a table disagree
  (Breakout 10%: Fig. 4/5 ≈185, Table 2 136.9), the table is the reference.

Both are keyed by (task, data ratio), then by variant: "lamo" and "dt" are lamo.py's two models with
the task's defaults; the other variants (grids.VARIANTS) change one setting of LaMo.

Scores: MuJoCo and Kitchen D4RL normalised; Reacher2d return / 100; Atari human-normalised. The
paper ran Kitchen on D4RL's kitchen-*-v0, we on Minari's v2 re-recording (comparable in kind, not
bit for bit); Reacher2d on the authors' unpublished data (ours is regenerated, reacher2d.py).
"""
from __future__ import annotations


def columns(variants: tuple[str, ...], rows: dict) -> dict:
    """{cell: (score per variant, in order)} -> {cell: {variant: score}}."""
    return {cell: dict(zip(variants, scores, strict=True)) for cell, scores in rows.items()}


LAMO_DT = ("lamo", "dt")

TABLE_3 = columns(LAMO_DT, {  # MuJoCo medium
    ("hopper-medium-v2", 1.0): ((74.1, 5.3), (60.9, 3.3)),
    ("hopper-medium-v2", 0.005): ((57.0, 7.1), (35.8, 6.6)),
    ("hopper-medium-v2", 0.01): ((52.0, 4.6), (41.9, 5.2)),
    ("hopper-medium-v2", 0.1): ((73.7, 3.5), (57.3, 3.8)),
    ("halfcheetah-medium-v2", 1.0): ((42.5, 0.4), (42.6, 0.5)),
    ("halfcheetah-medium-v2", 0.005): ((39.0, 1.6), (22.4, 5.2)),
    ("halfcheetah-medium-v2", 0.01): ((40.6, 1.3), (29.6, 4.8)),
    ("halfcheetah-medium-v2", 0.1): ((42.1, 0.6), (41.7, 0.8)),
    ("walker2d-medium-v2", 1.0): ((73.3, 3.1), (70.2, 4.3)),
    ("walker2d-medium-v2", 0.005): ((66.9, 5.4), (16.7, 4.8)),
    ("walker2d-medium-v2", 0.01): ((74.5, 4.7), (38.9, 9.3)),
    ("walker2d-medium-v2", 0.1): ((70.4, 4.2), (70.2, 7.5)),
})

# Table 16, "LaMo w/o pre-training" (a frozen random GPT-2 + LoRA + MLP) on MuJoCo medium: its LaMo
# and DT columns are Table 3's; the w/o-PT column's std was not transcribed (None).
NO_PRETRAINING_DENSE = {
    "hopper-medium-v2": (43.5, 46.0, 57.7, 64.5),
    "halfcheetah-medium-v2": (39.2, 40.6, 41.4, 42.8),
    "walker2d-medium-v2": (57.0, 74.2, 70.9, 69.8),
}
TABLE_16 = {(task, frac): {"lamo": TABLE_3[task, frac]["lamo"], "lamo-nopt": (score, None),
                           "dt": TABLE_3[task, frac]["dt"]}
            for task, scores in NO_PRETRAINING_DENSE.items()
            for frac, score in zip((0.005, 0.01, 0.1, 1.0), scores, strict=True)}

PAPER_TABLES = {
    "Table 3": TABLE_3,
    "Table 1": columns(LAMO_DT, {  # Kitchen and Reacher2d
        ("kitchen-partial-v2", 1.0): ((46.6, 5.3), (33.8, 14.5)),
        ("kitchen-partial-v2", 0.01): ((11.6, 3.0), (0.9, 0.9)),
        ("kitchen-partial-v2", 0.1): ((35.1, 5.2), (22.6, 6.8)),
        ("kitchen-complete-v2", 1.0): ((64.2, 5.3), (52.8, 3.7)),
        ("kitchen-complete-v2", 0.3): ((45.9, 2.9), (31.5, 4.5)),
        ("kitchen-complete-v2", 0.5): ((50.6, 6.1), (36.6, 5.1)),
        ("reacher2d-medium", 1.0): ((33.0, 8.3), (22.8, 6.0)),
        ("reacher2d-medium", 0.1): ((12.4, 3.8), (2.3, 1.5)),
        ("reacher2d-medium", 0.3): ((31.2, 7.6), (6.4, 2.6)),
    }),
    "Table 2": columns(LAMO_DT, {  # Atari
        ("breakout-medium", 1.0): ((473.4, 195.6), (402.8, 147.6)),
        ("breakout-medium", 0.1): ((136.9, 91.1), (45.0, 18.6)),
        ("qbert-medium", 1.0): ((79.0, 13.1), (28.9, 18.3)),
        ("qbert-medium", 0.1): ((63.6, 17.2), (26.1, 14.3)),
        ("pong-medium", 1.0): ((125.6, 6.6), (116.1, 10.4)),
        ("pong-medium", 0.1): ((114.8, 8.8), (87.1, 19.7)),
    }),
    "Table 8": columns(LAMO_DT, {  # MuJoCo medium-replay, 1%
        ("hopper-medium-replay-v2", 0.01): ((29.4, 6.3), (29.3, 4.0)),
        ("halfcheetah-medium-replay-v2", 0.01): ((14.6, 4.5), (10.0, 2.6)),
        ("walker2d-medium-replay-v2", 0.01): ((28.1, 1.0), (12.4, 1.3)),
    }),
    "Table 9": columns(LAMO_DT, {  # MuJoCo medium-expert, 100%; DT copied from IQL's paper, no std
        ("hopper-medium-expert-v2", 1.0): ((109.9, 1.4), (107.6, None)),
        ("halfcheetah-medium-expert-v2", 1.0): ((92.2, 0.7), (86.8, None)),
        ("walker2d-medium-expert-v2", 1.0): ((108.3, 1.1), (108.1, None)),
    }),
    "Table 10": columns(LAMO_DT, {  # more Atari games, 10%
        ("freeway-medium", 0.1): ((83.0, 1.7), (70.1, 4.0)),
        ("asterix-medium", 0.1): ((2.8, 1.0), (0.7, 0.7)),
    }),
    "Table 11": columns(LAMO_DT, {  # Ant medium
        ("ant-medium-v2", 0.005): ((90.2, 3.7), (76.5, 4.9)),
        ("ant-medium-v2", 0.01): ((86.3, 6.2), (77.8, 4.8)),
        ("ant-medium-v2", 0.1): ((87.8, 4.5), (87.2, 4.6)),
    }),
    "Table 15": columns(("lamo", "lamo-nopt", "dt"), {  # w/o pre-training, sparse reward
        ("kitchen-partial-v2", 0.01): ((11.6, 3.0), (9.8, 2.6), (0.9, 0.9)),
        ("kitchen-partial-v2", 0.1): ((35.1, 5.2), (24.8, 4.3), (22.6, 6.8)),
        ("kitchen-partial-v2", 1.0): ((46.6, 5.3), (43.6, 7.4), (33.8, 14.5)),
        ("kitchen-complete-v2", 0.3): ((45.9, 2.9), (42.4, 4.7), (31.5, 4.5)),
        ("kitchen-complete-v2", 0.5): ((50.6, 6.1), (56.8, 4.5), (36.6, 5.1)),
        ("kitchen-complete-v2", 1.0): ((64.2, 5.3), (51.8, 3.7), (52.8, 3.7)),
        ("reacher2d-medium", 0.1): ((12.4, 3.8), (6.8, 3.6), (2.3, 1.5)),
        ("reacher2d-medium", 0.3): ((31.2, 7.6), (20.2, 5.4), (6.4, 2.6)),
        ("reacher2d-medium", 1.0): ((33.0, 8.3), (28.2, 8.4), (22.8, 6.0)),
    }),
    "Table 16": TABLE_16,   # w/o pre-training, dense reward
}

# ≈, read off the paper's bar plots (means only, ± 2-5 points): not printed numbers.
PAPER_FIGURES = {
    "Fig. 4": columns(("lamo", "lamo-linear", "dt"), {  # MLP vs linear embeddings
        ("halfcheetah-medium-v2", 0.01): (40, 39, 29),
        ("walker2d-medium-v2", 0.01): (74, 59, 38),
        ("breakout-medium", 0.1): (185, 75, 25),
        ("qbert-medium", 0.1): (68, 28, 30),
        ("pong-medium", 0.1): (108, 95, 85),
        ("reacher2d-medium", 0.1): (11, 8, 2.5),
        ("kitchen-partial-v2", 0.1): (33, 25, 19),
        ("kitchen-complete-v2", 0.5): (58, 31, 36),
    }),
    "Fig. 5": columns(("lamo", "lamo-full", "lamo-frozen", "dt"), {  # LoRA, full, frozen
        ("hopper-medium-v2", 0.01): (50, 45, 45, 38),
        ("halfcheetah-medium-v2", 0.01): (40, 40, 37, 29),
        ("walker2d-medium-v2", 0.01): (73, 57, 54, 37),
        ("breakout-medium", 0.1): (185, 57, 190, 25),
        ("qbert-medium", 0.1): (69, 14, 56, 31),
        ("pong-medium", 0.1): (107, 0, 105, 85),    # full fine-tuning collapses
        ("reacher2d-medium", 0.1): (11, 5, 10.5, 2.5),
        ("kitchen-complete-v2", 0.5): (53, 53, 43, 36),
    }),
    "Fig. 6": columns(("lamo-lm", "lamo-nolm", "dt"), {  # language loss: λ 0.1, λ 0
        ("kitchen-partial-v2", 0.1): (34, 25, 20),
        ("kitchen-partial-v2", 0.01): (13, 10, 1),
        ("kitchen-complete-v2", 0.3): (44, 23, 31),
    }),
    "Fig. 10": columns(("lamo-gpt2-medium", "lamo-gpt2"), {  # model size
        ("kitchen-partial-v2", 1.0): (41, 35),
        ("kitchen-complete-v2", 0.3): (43, 31),
        ("kitchen-complete-v2", 0.5): (43, 50),
    }),
}

# Cells whose LaMo the paper ran on more than the task's defaults: GPT-2 medium for Kitchen
# Complete 30% and Partial 100% (Table 1). grids.py keeps it for every LaMo variant of such a cell;
# lamo.paper_reference compares a run alone with the paper only if it trained that.
PAPER_SETTINGS = {("kitchen-complete-v2", 0.3): (("pretrained", "gpt2-medium"),),
                  ("kitchen-partial-v2", 1.0): (("pretrained", "gpt2-medium"),)}

# {(task, frac, model): (mean, std, table)} for the tables whose columns are lamo.py's two models as
# they are, LaMo and DT (with PAPER_SETTINGS): summary.json's "paper" cell and curve.png's lines
# for a run of that (task, ratio, model) that trained those settings (lamo.paper_reference).
# Tables 15 and 16 repeat Tables 1 and 3 there, and add a variant.
MODEL_TABLES = ("Table 1", "Table 2", "Table 3", "Table 8", "Table 9", "Table 10", "Table 11")
PAPER = {(task, frac, model): (*score, table)
         for table in MODEL_TABLES for (task, frac), scores in PAPER_TABLES[table].items()
         for model, score in scores.items()}
