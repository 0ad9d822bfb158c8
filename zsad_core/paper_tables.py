"""The numbers the papers report (results/paper/*.csv, copied from the project's shared paper tables
with their sources), for the notebooks to set beside zsad's own numbers.

Each row is one number, in percent as printed. `trust` is the tag its source starts with:
PRIMARY (read off an image of the paper's table in the official repository), AUTHOR-REBUTTAL,
SECONDARY (a third-party copy; check against the paper), REPO-LOG / REPO-README (released code).
"""
from __future__ import annotations

from pathlib import Path

PAPER_DIR = Path(__file__).resolve().parent.parent / "results" / "paper"


def paper_numbers(**filters):
    """All reported numbers as a DataFrame, optionally filtered by column value(s), e.g.
    `paper_numbers(paper="AnomalyCLIP", dataset=["MVTec AD", "VisA"], metric="AUROC")`."""
    import pandas as pd

    frames = [pd.read_csv(f) for f in sorted(PAPER_DIR.glob("*.csv"))]
    table = pd.concat(frames, ignore_index=True)
    table["trust"] = table["source"].str.split(":").str[0].str.strip()
    for column, wanted in filters.items():
        wanted = [wanted] if isinstance(wanted, str) else list(wanted)
        table = table[table[column].isin(wanted)]
    return table.reset_index(drop=True)
