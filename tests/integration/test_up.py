"""`closeloop up` as a user runs it: starts, serves, reports status, stops with no orphans."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from processors.embedded.broker import free_port

from .worker_proc import REPO, alive, wait_for


def test_up_status_and_clean_stop(tmp_path: Path) -> None:
    home = tmp_path / "home"
    grpc, http, web = free_port(), free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "CLOSELOOP_CLICKHOUSE_SQL_PORT": "0"}
    cmd = [sys.executable, "-m", "processors.cli"]
    up = subprocess.Popen(
        cmd
        + [
            "up",
            "--home",
            str(home),
            "--otlp-grpc-port",
            str(grpc),
            "--otlp-http-port",
            str(http),
            "--web-port",
            str(web),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    out = []
    try:

        def printed_up() -> bool:
            line = up.stdout.readline().decode()
            out.append(line)
            return "closeloop is up" in line or up.poll() is not None

        assert wait_for(printed_up, 120, 0), "".join(out)
        assert up.poll() is None, "".join(out)
        stack = json.loads((home / "run" / "stack.json").read_text())
        pids = [stack["broker_pid"], *stack["children"].values()]
        assert set(stack["children"]) == {"worker", "gateway", "web"}

        status = subprocess.run(
            cmd + ["status", "--home", str(home), "--json"],
            env=env,
            capture_output=True,
            timeout=120,
            cwd=tmp_path,
        )
        st = json.loads(status.stdout)
        assert st["running"]
        assert all(p["alive"] for p in st["processes"].values()), st["processes"]
        assert {"spans", "turns", "conversations", "intents", "diagnoses", "outcomes"} <= set(
            st["tables"]
        )
        assert "otlp_spans" in st["topics"] and st["deadletters"] == 0

        # The endpoints answer: OTLP/HTTP (an empty request is a valid export) and the page.
        req = urllib.request.Request(
            f"http://127.0.0.1:{http}/v1/traces",
            data=b"",
            headers={"Content-Type": "application/x-protobuf"},
        )
        assert urllib.request.urlopen(req, timeout=10).status == 200
        browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
        page = browser.open(
            json.loads((home / "run" / "web.json").read_text())["login_url"], timeout=10
        )
        assert page.status == 200 and b"closeloop" in page.read()

        sql = subprocess.run(
            cmd + ["sql", "--home", str(home), "SELECT count() FROM spans", "--format", "TSV"],
            env=env,
            capture_output=True,
            timeout=60,
            cwd=tmp_path,
        )
        assert sql.stdout.strip() == b"0", sql.stderr
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(60)
    assert up.returncode == 0
    assert wait_for(lambda: not any(alive(p) for p in pids), 10), "orphan processes left"
    assert not (home / "run" / "stack.json").exists()


def test_up_with_home_reads_the_homes_closeloop_yaml(tmp_path: Path) -> None:
    """`closeloop up --home DIR` takes DIR/closeloop.yaml (what the demo writes there)."""
    home = tmp_path / "home"
    home.mkdir()
    web, http = free_port(), free_port()
    (home / "closeloop.yaml").write_text(
        f"otlp:\n  http_port: {http}\n  grpc_port: 0\nweb:\n  port: {web}\n"
        "clickhouse:\n  sql_port: 0\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLOSELOOP_")}
    up = subprocess.Popen(
        [sys.executable, "-m", "processors.cli", "up", "--home", str(home)],
        env={**env, "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    try:
        stack_file = home / "run" / "stack.json"
        assert wait_for(lambda: stack_file.exists() or up.poll() is not None, 180)
        assert up.poll() is None
        stack = json.loads(stack_file.read_text())
        assert stack["otlp_http"] == f"http://127.0.0.1:{http}"
        assert stack["web"] == f"http://127.0.0.1:{web}"
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(60)
