"""The ClickHouse store: one surface over chDB (embedded) and a ClickHouse server.

chDB lets one process own a store. In the embedded stack the worker owns it and
serves it on a local ClickHouse-compatible HTTP endpoint (:mod:`processors.embedded.sqlserver`);
:func:`open_store` uses that endpoint when the stack runs and opens the store
directly when nothing does, so callers never care which.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from collections.abc import Iterable, Sequence
from operator import itemgetter
from pathlib import Path
from typing import Any

import clickhouse_connect

from processors.config import Config
from processors.credentials import Credential, load_sql_credentials
from processors.errors import StoreError

# Inside the package, so a wheel carries it (package data); the repository's top-level
# ``schemas`` is a symlink to it.
SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"
MIGRATIONS_TABLE = "schema_migrations"
_MIGRATION_NAME = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")


def schema_dir() -> Path:
    """The DDL folder shipped in the package (``processors/schemas``)."""
    if SCHEMA_DIR.is_dir():
        return SCHEMA_DIR
    raise StoreError(f"schema folder not found at {SCHEMA_DIR}: a broken closeloop install")


def split_statements(sql: str) -> list[str]:
    """Split a DDL file on ``;`` at line ends, dropping ``--`` comment lines."""
    lines = [ln for ln in sql.splitlines() if not ln.strip().startswith("--")]
    text = "\n".join(lines)
    return [s.strip() for s in re.split(r";\s*(?:\n|$)", text) if s.strip()]


def migrations() -> list[tuple[int, str, str]]:
    """``(version, name, sql)`` of every ``schemas/NNN_name.sql``, in order."""
    out = []
    for p in sorted(schema_dir().glob("*.sql")):
        m = _MIGRATION_NAME.match(p.name)
        if not m:
            raise StoreError(f"schema file {p.name} is not named NNN_name.sql")
        if out and out[-1][0] == int(m.group(1)):
            # the version is what schema_migrations orders by: two files of one number would
            # apply in an order no one chose
            raise StoreError(
                f"schema files {out[-1][1]} and {p.stem} share the number {m.group(1)}"
            )
        out.append((int(m.group(1)), p.stem, p.read_text()))
    return out


def _store_error(what: str, e: Exception) -> StoreError:
    """The ClickHouse error, with the fix when closeloop's tables are missing."""
    text = str(e)
    if "UNKNOWN_TABLE" in text or "Code: 60." in text:
        return StoreError(
            f"closeloop's tables are not there (ClickHouse: {text.splitlines()[0]}) — "
            "run `closeloop migrate` (a ClickHouse server) or `closeloop up` (the embedded store)"
        )
    return StoreError(f"ClickHouse {what} failed: {text}")


class Store:
    """A ClickHouse client plus closeloop's conveniences. Thread-safe for the chDB backend."""

    def __init__(self, client: Any, dsn: str) -> None:
        self.client = client
        self.dsn = dsn
        self._lock = threading.RLock()

    # -- queries -------------------------------------------------------------------------
    def command(self, sql: str, parameters: dict[str, Any] | None = None) -> Any:
        with self._lock:
            try:
                return self.client.command(sql, parameters=parameters)
            except Exception as e:  # clickhouse-connect raises its own hierarchy
                raise _store_error("command", e) from e

    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Rows as dicts (small results: pages, CLI, tests)."""
        with self._lock:
            try:
                res = self.client.query(sql, parameters=parameters)
            except Exception as e:
                raise _store_error("query", e) from e
        names = res.column_names
        return [dict(zip(names, row)) for row in res.result_rows]

    def scalar(self, sql: str, parameters: dict[str, Any] | None = None) -> Any:
        rows = self.query(sql, parameters)
        return next(iter(rows[0].values())) if rows else None

    def raw(self, sql: str, fmt: str = "TabSeparatedWithNames") -> bytes:
        """The result in a ClickHouse output format, as bytes (``closeloop sql``)."""
        with self._lock:
            try:
                return self.client.raw_query(sql, fmt=fmt)
            except Exception as e:
                raise _store_error("query", e) from e

    def insert(self, table: str, rows: Sequence[Sequence[Any]], columns: Sequence[str]) -> int:
        """Insert rows (row-major). Returns the number written."""
        if not rows:
            return 0
        with self._lock:
            try:
                self.client.insert(table, rows, column_names=list(columns))
            except Exception as e:
                raise StoreError(f"insert into {table} failed: {e}") from e
        return len(rows)

    def insert_columns(self, table: str, columns: dict[str, list[Any]]) -> int:
        """Columnar insert (faster for large batches)."""
        names = list(columns)
        n = len(columns[names[0]]) if names else 0
        if not n:
            return 0
        with self._lock:
            try:
                self.client.insert(
                    table, [columns[c] for c in names], column_names=names, column_oriented=True
                )
            except Exception as e:
                raise StoreError(f"insert into {table} failed: {e}") from e
        return n

    def insert_records(self, table: str, records: Iterable[dict[str, Any]]) -> int:
        """Insert dicts, column-oriented (:meth:`columns_of`)."""
        return self.insert_columns(table, self.columns_of(table, list(records)))

    def columns_of(self, table: str, records: list[dict[str, Any]]) -> dict[str, list[Any]]:
        """``records`` as the columns :meth:`insert_columns` takes; nested lists/dicts in String
        columns become JSON.

        The columns are those of the first record that the table has (a record without one
        gives None there). Records are turned into columns in C (itemgetter, zip): per-value
        Python here was most of an insert's cost.
        """
        if not records:
            return {}
        types = self.column_types(table)
        cols = [c for c in records[0] if c in types]
        if not cols:
            return {}
        try:
            rows = list(map(itemgetter(*cols), records))
        except KeyError:  # records of different shapes
            rows = [tuple(r.get(c) for c in cols) for r in records]
        if len(cols) == 1:
            rows = [(v,) for v in rows]
        columns = [list(c) for c in zip(*rows)]
        for i, c in enumerate(cols):
            if types[c] == "String" and any(
                issubclass(k, (dict, list)) for k in set(map(type, columns[i]))
            ):
                columns[i] = [
                    json.dumps(v, ensure_ascii=False) if isinstance(v, (dict, list)) else v
                    for v in columns[i]
                ]
        return dict(zip(cols, columns))

    _types_cache: dict[str, dict[str, str]]

    def column_types(self, table: str) -> dict[str, str]:
        """Insertable columns of a table and their types (MATERIALIZED columns excluded)."""
        cache = self.__dict__.setdefault("_types_cache", {})
        if table not in cache:
            rows = self.query(
                "SELECT name, type FROM system.columns WHERE database = currentDatabase() "
                "AND table = {t:String} AND default_kind NOT IN ('MATERIALIZED', 'ALIAS')",
                {"t": table},
            )
            if not rows:
                raise StoreError(f"table {table!r} does not exist; run `closeloop migrate`")
            cache[table] = {r["name"]: r["type"] for r in rows}
        return cache[table]

    # -- schema --------------------------------------------------------------------------
    def migrate(self) -> list[str]:
        """Apply ``schemas/*.sql`` not yet applied, in order; return the names applied."""
        self.command(
            f"CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} (version UInt32, name String, "
            "applied_ns UInt64) ENGINE = ReplacingMergeTree ORDER BY version"
        )
        done = {r["version"] for r in self.query(f"SELECT version FROM {MIGRATIONS_TABLE} FINAL")}
        applied = []
        for version, name, sql in migrations():
            if version in done:
                continue
            for stmt in split_statements(sql):
                self.command(stmt)
            self.insert(
                MIGRATIONS_TABLE,
                [[version, name, time.time_ns()]],
                ["version", "name", "applied_ns"],
            )
            applied.append(name)
        self.__dict__.pop("_types_cache", None)
        return applied

    def table_counts(self) -> dict[str, int]:
        rows = self.query(
            "SELECT name FROM system.tables WHERE database = currentDatabase() "
            "AND engine LIKE '%MergeTree' ORDER BY name"
        )
        out = {}
        for r in rows:
            out[r["name"]] = int(self.scalar(f"SELECT count() FROM `{r['name']}` FINAL") or 0)
        return out

    def close(self) -> None:
        # closing a dead connection is not an error worth raising
        with self._lock, contextlib.suppress(Exception):
            self.client.close()


def running_endpoint(cfg: Config) -> str | None:
    """The SQL endpoint of a running embedded stack, if any (written by the store owner)."""
    f = cfg.run_dir() / "sql.json"
    if not f.exists():
        return None
    try:
        info = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    import os

    pid = info.get("pid")
    if not pid:
        return None
    try:
        os.kill(int(pid), 0)
    except OSError:
        return None
    return info.get("url")


def open_store(
    cfg: Config, *, owner: bool = False, migrate: bool = True, read_only: bool = False
) -> Store:
    """Open the configured store.

    ``owner=True`` opens the chDB store directly (the process that serves it). Otherwise,
    for the embedded store, the running stack's SQL endpoint is used when there is one, as the
    stages' writer or, with ``read_only``, as the reader (``closeloop sql``); when there is none
    the chDB store is opened here and, unless ``migrate=False``, migrated first (idempotent),
    so a command run before `closeloop up` finds empty tables, not missing ones.
    """
    dsn = cfg.clickhouse_dsn
    if dsn.startswith("chdb://") and not owner:
        url = running_endpoint(cfg)
        if url:
            creds = load_sql_credentials(cfg.run_dir())
            return connect_http(url, creds.reader if read_only else creds.writer)
        store = connect(dsn)
        if migrate:
            try:
                store.migrate()
            except StoreError:
                store.close()
                raise
        return store
    return connect(dsn)


def connect_http(url: str, credential: Credential | None = None) -> Store:
    """A store over ClickHouse's HTTP interface; the user is ``credential``, else the URL's."""
    from urllib.parse import unquote, urlparse

    u = urlparse(url)
    user = credential.user if credential else unquote(u.username or "default")
    password = credential.password if credential else unquote(u.password or "")
    try:
        client = clickhouse_connect.get_client(
            host=u.hostname,
            port=u.port or 8123,
            username=user,
            password=password,
            secure=u.scheme == "https",
            database=(u.path or "/").strip("/") or "default",
            autogenerate_session_id=False,
            compress=False,
        )
    except Exception as e:
        raise StoreError(f"cannot reach ClickHouse at {u.hostname}:{u.port}: {e}") from e
    return Store(client, u._replace(netloc=f"{u.hostname}:{u.port or 8123}").geturl())


def connect(dsn: str) -> Store:
    """A store for a DSN: ``chdb:///path`` (embedded) or ``http(s)://user:pass@host:port/db``."""
    if dsn.startswith("chdb://"):
        path = dsn[len("chdb://") :]
        Path(path).mkdir(parents=True, exist_ok=True)
        try:
            client = clickhouse_connect.get_client(dsn=f"chdb://{path}")
        except Exception as e:
            msg = str(e)
            if "EmbeddedServer" in msg or "Code: 36" in msg:
                raise StoreError(
                    f"the chDB store {path} is open in another process; only one process can own it. "
                    "Use the running stack (`closeloop sql` goes through it) or stop it first."
                ) from e
            raise StoreError(f"cannot open chDB store {path}: {e}") from e
        return Store(client, dsn)
    if dsn.startswith(("http://", "https://", "clickhouse://")):
        return connect_http(dsn.replace("clickhouse://", "http://", 1))
    raise StoreError(f"unsupported ClickHouse DSN {dsn!r}")
