"""The columns a table has once every schemas migration ran: what rows must match."""

from __future__ import annotations

import re

from processors.store import migrations, split_statements


def ddl_columns(table: str) -> list[str]:
    """Insertable columns of ``table`` over all migrations, in order: CREATE, then each
    ALTER ... ADD COLUMN (after the column it names, else last); MATERIALIZED ones left out."""
    cols: list[str] = []
    for _, _, sql in migrations():
        for stmt in split_statements(sql):
            m = re.match(
                rf"CREATE TABLE IF NOT EXISTS {table}\s*\((.*)\)\s*ENGINE", stmt, re.DOTALL
            )
            if m:
                cols += [
                    ln.split()[0]
                    for ln in m.group(1).splitlines()
                    if ln.strip() and "MATERIALIZED" not in ln and not ln.strip().startswith("--")
                ]
            m = re.match(rf"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS (\w+) (.*)", stmt, re.S)
            if m and "MATERIALIZED" not in m.group(2):
                after = re.search(r"\bAFTER (\w+)", m.group(2))
                cols.insert(cols.index(after.group(1)) + 1 if after else len(cols), m.group(1))
    return cols
