"""Capture core throughput: realistic GenAI spans through ``Capture.process``, spans/s per case.

Run: ``python bench/capture_core.py [--spans N]``. Prints a table; no assertions (speed is
measured here, not in tests). Each Kafka message holds one OTLP request of 200 spans, as a
batching collector sends them.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Iterable

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from processors.capture.core import Capture, RawMessage
from processors.config import CaptureConfig
from processors.redact import Redactor

SPANS_PER_REQUEST = 200
KINDS = ("llm", "llm", "tool", "other")  # the spans of an agent turn, in proportion
T0 = 1_731_000_000_000_000_000
WORDS = [
    "the",
    "order",
    "arrived",
    "late",
    "and",
    "the",
    "invoice",
    "shows",
    "a",
    "different",
    "amount",
    "than",
    "my",
    "plan",
    "please",
    "check",
    "my",
    "account",
    "settings",
    "and",
    "tell",
    "me",
    "why",
    "the",
    "export",
    "keeps",
    "failing",
]


def _kv(k: str, v: object) -> KeyValue:
    kv = KeyValue(key=k)
    if isinstance(v, int):
        kv.value.int_value = v
    else:
        kv.value.string_value = str(v)
    return kv


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _attrs(kind: str, i: int, rng: random.Random, content: bool) -> dict[str, object]:
    """~10-20 attributes per span, as GenAI instrumentations write them."""
    base = {
        "gen_ai.conversation.id": f"conv-{i // 8}",
        "gen_ai.agent.name": "support",
        "gen_ai.agent.version": "1.4.2",
        "closeloop.prompt.version": "p-7",
    }
    if kind == "llm":
        a = {
            **base,
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": "openai",
            "gen_ai.request.model": "gpt-4o-mini",
            "gen_ai.response.model": "gpt-4o-mini-2024-07-18",
            "gen_ai.request.temperature": 0.2,
            "gen_ai.request.max_tokens": 512,
            "gen_ai.response.id": f"chatcmpl-{i:08d}",
            "gen_ai.response.finish_reasons": "stop",
            "gen_ai.usage.input_tokens": rng.randint(100, 4000),
            "gen_ai.usage.output_tokens": rng.randint(5, 400),
            "server.address": "api.openai.com",
            "server.port": 443,
        }
        if content:
            msgs = [
                {
                    "role": "user" if j % 2 == 0 else "assistant",
                    "parts": [{"type": "text", "content": _sentence(rng, 25)}],
                }
                for j in range(4)
            ]
            a["gen_ai.input.messages"] = json.dumps(msgs)
            a["gen_ai.output.messages"] = json.dumps(
                [
                    {
                        "role": "assistant",
                        "finish_reason": "stop",
                        "parts": [{"type": "text", "content": _sentence(rng, 30)}],
                    }
                ]
            )
            a["gen_ai.system_instructions"] = json.dumps(
                [{"type": "text", "content": "You are a support agent."}]
            )
        return a
    if kind == "tool":
        a = {
            **base,
            "gen_ai.operation.name": "execute_tool",
            "gen_ai.tool.name": "lookup_order",
            "gen_ai.tool.call.id": f"call_{i}",
            "gen_ai.tool.type": "function",
        }
        if content:
            a["gen_ai.tool.call.arguments"] = json.dumps({"order_id": f"A{i:06d}"})
            a["gen_ai.tool.call.result"] = json.dumps({"status": "shipped", "eta_days": 2})
        return a
    return {
        "http.request.method": "POST",
        "http.route": "/v1/chat",
        "http.response.status_code": 200,
        "url.path": "/v1/chat",
        "server.address": "agent.internal",
        "user_agent.original": "python-httpx/0.27",
        "network.protocol.version": "1.1",
        "client.address": "10.0.0.1",
    }


def export_request(spans: Iterable[Span]) -> bytes:
    """An OTLP export request of ``spans`` from the benchmarks' support agent, as its OpenAI
    instrumentation sends them (the one request builder of bench/)."""
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.extend(
        [
            _kv("service.name", "support-agent"),
            _kv("service.version", "1.4.2"),
            _kv("telemetry.sdk.language", "python"),
        ]
    )
    ss = rs.scope_spans.add()
    ss.scope.name = "opentelemetry.instrumentation.openai_v2"
    ss.spans.extend(spans)
    return req.SerializeToString()


def make_messages(n_spans: int, content: bool, seed: int = 7) -> list[RawMessage]:
    rng = random.Random(seed)
    out = []
    for m in range(0, n_spans, SPANS_PER_REQUEST):
        spans = []
        for i in range(m, min(m + SPANS_PER_REQUEST, n_spans)):
            kind = KINDS[i % len(KINDS)]
            spans.append(
                Span(
                    trace_id=rng.randbytes(16),
                    span_id=rng.randbytes(8),
                    parent_span_id=rng.randbytes(8),
                    name=f"{kind} span",
                    start_time_unix_nano=T0 + i,
                    end_time_unix_nano=T0 + i + 1_000_000,
                    attributes=[_kv(k, v) for k, v in _attrs(kind, i, rng, content).items()],
                )
            )
        out.append(RawMessage("otlp_spans", 0, m, None, export_request(spans)))
    return out


def bench(name: str, messages: list[RawMessage], n_spans: int, redact: bool) -> tuple[str, float]:
    cfg = CaptureConfig(redact=["secrets", "emails", "cards", "phones"] if redact else [])
    cap = Capture(cfg, Redactor(cfg.redact))
    cap.process(messages[:1], 0)  # warm up
    best = 0.0
    for _ in range(3):
        t = time.perf_counter()
        batch = cap.process(messages, 0)
        dt = time.perf_counter() - t
        assert len(batch.span_rows) == n_spans and not batch.deadletters
        best = max(best, n_spans / dt)
    return name, best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spans", type=int, default=20_000)
    n = ap.parse_args().spans
    rows = []
    for content in (False, True):
        msgs = make_messages(n, content)
        size = sum(len(m.value) for m in msgs) / n
        for redact in (True, False):
            name = f"{'with' if content else 'no'} message content, redaction {'on' if redact else 'off'}"
            rows.append((*bench(name, msgs, n, redact), size))
    print(f"{'case':<48} {'spans/s':>10} {'bytes/span':>11}")
    for name, rate, size in rows:
        print(f"{name:<48} {rate:>10,.0f} {size:>11,.0f}")
    text = (
        " ".join(_sentence(random.Random(1), 200) for _ in range(50))
        + " mail a@b.com key sk-proj-"
        + "x1Y2" * 8
    )
    r = Redactor()
    t = time.perf_counter()
    for _ in range(20):
        r._cache.clear()
        r.redact(text)
    dt = (time.perf_counter() - t) / 20
    print(
        f"{'redact one ' + format(len(text), ',') + '-char text':<48} {len(text) / dt / 1e6:>8.1f} MB/s"
    )


if __name__ == "__main__":
    main()
