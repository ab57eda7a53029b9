"""Gateway throughput: OTLP/HTTP protobuf requests of GenAI spans, acknowledged by the broker.

Starts a tansu broker and the gateway as a separate process (as ``closeloop up`` does), then
fires ``--requests`` requests of ``--spans`` spans from ``--threads`` keep-alive connections and
prints spans/s acknowledged (every 200 answer means every span is on the broker, acks=all).
The requests are ``bench.ingest``'s GenAI traffic (:func:`bench.ingest.request`).

    python bench/gateway.py [--requests 200] [--spans 500] [--threads 4] [--spans-per-trace 10]
"""

from __future__ import annotations

import argparse
import http.client
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from bench.ingest import request
from processors.embedded.broker import EmbeddedBroker, ensure_topics

DISTINCT_BODIES = 8


def fire(port: int, bodies: list[bytes], n: int, codes: list[int]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    for i in range(n):
        conn.request(
            "POST",
            "/v1/traces",
            bodies[i % len(bodies)],
            {"Content-Type": "application/x-protobuf"},
        )
        r = conn.getresponse()
        r.read()
        codes.append(r.status)
    conn.close()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--spans", type=int, default=500)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--spans-per-trace", type=int, default=10)
    a = p.parse_args()
    bodies = [request(k, a.spans, a.spans_per_trace) for k in range(DISTINCT_BODIES)]
    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker() as broker:
        ensure_topics(broker.bootstrap, ["otlp_spans", "otlp_logs"], 4)
        cfg = Path(tmp) / "closeloop.yaml"
        cfg.write_text(yaml.safe_dump({"kafka": {"partitions": 4}}))
        env = {k: v for k, v in os.environ.items() if not k.startswith("CLOSELOOP_")}
        gw = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "processors.capture.gateway",
                "--config",
                str(cfg),
                "--bootstrap",
                broker.bootstrap,
                "--grpc-port",
                "0",
                "--http-port",
                "0",
                "--log-level",
                "WARNING",
            ],
            cwd=tmp,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            line = gw.stdout.readline()
            port = int(line.split("http=")[1].rsplit(":", 1)[1])
            fire(port, bodies, 2, [])  # warm-up: connections, metadata
            codes: list[int] = []
            per = a.requests // a.threads
            threads = [
                threading.Thread(target=fire, args=(port, bodies, per, codes))
                for _ in range(a.threads)
            ]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            dt = time.perf_counter() - t0
        finally:
            gw.terminate()
            gw.wait(30)
    ok = codes.count(200)
    mb = len(bodies[0]) * len(codes) / 1e6
    print(
        f"{'requests':>9} {'spans/req':>9} {'threads':>7} {'ok':>5} {'seconds':>8} "
        f"{'req/s':>7} {'spans/s':>9} {'MB/s':>6}"
    )
    print(
        f"{len(codes):>9} {a.spans:>9} {a.threads:>7} {ok:>5} {dt:>8.2f} {len(codes) / dt:>7.1f} "
        f"{ok * a.spans / dt:>9.0f} {mb / dt:>6.1f}"
    )


if __name__ == "__main__":
    main()
