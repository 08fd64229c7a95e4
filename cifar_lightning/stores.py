"""The SQLite files that outlive a run (the Optuna study, the MLflow store), checked before a
library opens them: one that something else broke (a disk that filled up, a copy cut short) is
one error line naming it, instead of SQLAlchemy's traceback. Nothing is changed on disk."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from cifar_lightning.errors import UserError


def check_sqlite(path: str | Path, what: str, remedy: str) -> None:
    """Raise UserError if `path` exists but is not a sound SQLite database: "PATH: not a readable
    SQLite database (why), so WHAT; REMEDY". A missing or empty file is a fresh store (the library
    creates it); a locked or unreadable one is left for the library to report. The file is opened
    read-only, so the check writes nothing, not even a journal."""
    path = Path(path)
    if not path.is_file():
        return
    try:
        con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            rows = con.execute("PRAGMA quick_check").fetchall()
        finally:
            con.close()
    except sqlite3.DatabaseError as exc:
        # exactly DatabaseError: "file is not a database", "database disk image is malformed";
        # its subclasses (OperationalError: locked, no permission, an I/O error) are no verdict
        if type(exc) is not sqlite3.DatabaseError:
            return
        problem = str(exc)
    else:
        if rows == [("ok",)]:
            return
        problem = "; ".join(str(r[0]) for r in rows[:2])
    problem = " ".join(problem.split())[:160]
    raise UserError(f"{path}: not a readable SQLite database ({problem}), so {what}; {remedy}")
