"""The wheel works on its own: built from the source tree, installed (not editable) where the
source tree is out of reach, ``closeloop --version`` and ``closeloop migrate`` run against chDB.

No network: the wheel is built without build isolation (setuptools from the test venv) and
installed with ``--no-deps --target`` into a folder that goes first on PYTHONPATH; its
dependencies come from the test venv. The repository is neither the working directory nor on
the path, so a DDL file read from the source tree instead of the package would fail here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from processors.embedded.broker import free_port

from .worker_proc import alive, wait_for

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder the wheel was installed into (package, dist-info and bin/closeloop)."""
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"  # a copy: building in place would leave build/ and *.egg-info behind
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(
        ROOT / "processors", src / "processors", ignore=shutil.ignore_patterns("__pycache__")
    )
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    dist = base / "dist"
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src)],
        check=True,
        cwd=base,
    )
    (wheel,) = dist.glob("closeloop-*.whl")
    target = base / "site"
    subprocess.run(
        [*pip, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
        check=True,
        cwd=base,
    )
    shutil.rmtree(src)  # nothing of the source tree is left next to the install
    return target


def _env(installed: Path, cwd: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLOSELOOP_")}
    env["PYTHONPATH"] = str(installed)  # replaces the developer's PYTHONPATH=<repo>
    env["CLOSELOOP_HOME"] = str(cwd / "home")
    env["CLOSELOOP_CLICKHOUSE"] = f"chdb://{cwd / 'store'}"
    return env


def _run(installed: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=_env(installed, cwd),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_installed_package_is_the_one_imported(installed: Path, tmp_path: Path) -> None:
    r = _run(
        installed,
        tmp_path,
        "-c",
        "import processors, processors.store as s; print(processors.__file__); print(s.SCHEMA_DIR)",
    )
    assert r.returncode == 0, r.stderr
    package_file, schema_dir = r.stdout.split()
    assert Path(package_file).is_relative_to(installed)
    assert Path(schema_dir).is_relative_to(installed)
    assert not Path(package_file).is_relative_to(ROOT)


def test_review_page_templates_ship_in_the_wheel(installed: Path, tmp_path: Path) -> None:
    r = _run(
        installed,
        tmp_path,
        "-c",
        "from processors.web.pages import render_message; import processors.web.templating as t;"
        " print(t.__file__); print(render_message('Not found', '<x>'))",
    )
    assert r.returncode == 0, r.stderr
    module, page = r.stdout.split("\n", 1)
    assert Path(module).is_relative_to(installed)
    assert "<h1>Not found</h1><p>&lt;x&gt;</p>" in page
    assert '<a href="/proposals">Proposals</a>' in page  # the base layout, from the package


def test_version_from_the_wheel(installed: Path, tmp_path: Path) -> None:
    r = _run(installed, tmp_path, str(installed / "bin" / "closeloop"), "--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "closeloop 0.1.0"


def test_migrate_from_the_wheel_against_chdb(installed: Path, tmp_path: Path) -> None:
    closeloop = str(installed / "bin" / "closeloop")
    first = _run(installed, tmp_path, closeloop, "migrate")
    assert first.returncode == 0, first.stderr
    shipped = sorted(p.stem for p in (installed / "processors" / "schemas").glob("*.sql"))
    assert shipped and first.stdout.strip() == "applied: " + ", ".join(shipped)
    again = _run(installed, tmp_path, closeloop, "migrate")
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == "applied: nothing (schema is current)"
    # read back in a process of its own: chDB opens one store per process, and this pytest
    # process may already hold another test's
    listed = _run(
        installed,
        tmp_path,
        "-c",
        "from processors.store import connect; import os;"
        "s = connect(os.environ['CLOSELOOP_CLICKHOUSE']);"
        "print('\\n'.join(r['name'] for r in s.query('SELECT name FROM schema_migrations')))",
    )
    assert listed.returncode == 0, listed.stderr
    assert set(listed.stdout.split()) == set(shipped)


def test_up_from_the_wheel(installed: Path, tmp_path: Path) -> None:
    """`closeloop up` from the wheel: its broker, gateway, worker and page processes start from
    the installed package too, and it stops cleanly."""
    env = {**_env(installed, tmp_path), "CLOSELOOP_CLICKHOUSE_SQL_PORT": "0"}
    del env["CLOSELOOP_CLICKHOUSE"]  # the embedded store under home, as a new user has it
    ports = [str(free_port()) for _ in range(3)]
    up = subprocess.Popen(
        [str(installed / "bin" / "closeloop"), "up", "--otlp-grpc-port", ports[0]]
        + ["--otlp-http-port", ports[1], "--web-port", ports[2]],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    out: list[str] = []
    try:

        def printed_up() -> bool:
            out.append(up.stdout.readline().decode() if up.stdout else "")
            return "closeloop is up" in out[-1] or up.poll() is not None

        assert wait_for(printed_up, 120, 0), "".join(out)
        assert up.poll() is None, "".join(out)
        stack = json.loads((tmp_path / "home" / "run" / "stack.json").read_text())
        pids = [stack["broker_pid"], *stack["children"].values()]
        assert set(stack["children"]) == {"worker", "gateway", "web"}
        assert all(alive(pid) for pid in pids)
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(60)
    assert up.returncode == 0, "".join(out)
    assert wait_for(lambda: not any(alive(p) for p in pids), 10), "orphan processes left"
