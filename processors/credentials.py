"""Local credentials: secret files readable by their owner only.

The embedded store's SQL endpoint takes two ClickHouse users, kept in one per-home file
(``<home>/run/sql-credentials.json``, mode 0600) created when the stack starts:

- the *reader* (``closeloop``): ``closeloop sql``, Grafana, clickhouse-connect; read-only;
- the *writer* (``closeloop_stages``): the stages' own client, the only one allowed to write.

Whoever can read the file is the user who started the stack; the split keeps anything a person
types or configures (a query, a dashboard) read-only.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from processors.errors import StoreError

SQL_CREDENTIALS_FILE = "sql-credentials.json"
READER_USER = "closeloop"
WRITER_USER = "closeloop_stages"


@dataclass(frozen=True)
class Credential:
    user: str
    password: str

    def matches(self, user: str, password: str) -> bool:
        """Constant-time comparison of both parts."""
        same_user = hmac.compare_digest(user.encode(), self.user.encode())
        same_password = hmac.compare_digest(password.encode(), self.password.encode())
        return same_user and same_password


@dataclass(frozen=True)
class SqlCredentials:
    reader: Credential
    writer: Credential


def write_secret_file(path: Path, text: str) -> None:
    """Write ``text`` readable by its owner only (0600), replacing any earlier file atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text if text.endswith("\n") else text + "\n")
    os.chmod(tmp, 0o600)
    tmp.replace(path)


def sql_credentials_path(run_dir: Path) -> Path:
    return run_dir / SQL_CREDENTIALS_FILE


def load_sql_credentials(run_dir: Path) -> SqlCredentials:
    """The home's SQL credentials; a StoreError naming the file when there are none."""
    path = sql_credentials_path(run_dir)
    try:
        data = json.loads(path.read_text())
        return SqlCredentials(
            reader=Credential(**data["reader"]), writer=Credential(**data["writer"])
        )
    except FileNotFoundError:
        raise StoreError(
            f"no SQL credentials at {path}; they are created by `closeloop up` / `closeloop demo`"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise StoreError(f"unreadable SQL credentials in {path}: {e}") from e


def ensure_sql_credentials(run_dir: Path) -> SqlCredentials:
    """The home's SQL credentials, created (random, 0600) when the home has none yet; kept
    across restarts so configured clients (Grafana) keep working."""
    path = sql_credentials_path(run_dir)
    if path.exists():
        return load_sql_credentials(run_dir)
    creds = SqlCredentials(
        reader=Credential(READER_USER, secrets.token_urlsafe(24)),
        writer=Credential(WRITER_USER, secrets.token_urlsafe(24)),
    )
    body = {"reader": vars(creds.reader), "writer": vars(creds.writer)}
    write_secret_file(path, json.dumps(body, indent=2))
    return creds
