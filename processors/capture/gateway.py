"""The embedded OTLP gateway: OTLP/gRPC and OTLP/HTTP in, Kafka out, as the stock collector does.

It stands in for otelcol-contrib with ``collector-config.yaml`` (``kafka`` exporter,
``encoding: otlp_proto``, ``partition_traces_by_id`` / ``partition_logs_by_trace_id``), so the
records it writes are those the collector writes and the processors cannot tell them apart:

- value: an ``ExportTraceServiceRequest`` / ``ExportLogsServiceRequest`` protobuf (OTLP/JSON
  input is converted, hex ids included), one message per (resource, scope, trace id), the
  collector's ``batchpersignal.SplitTraces`` grouping;
- key: the trace id as 32 lowercase hex characters (the collector's
  ``[]byte(traceutil.TraceIDToHexOrEmptyString(id))``, not the 16 raw bytes); log records
  without a trace id get no key.

A request is answered only once the broker acknowledged every one of its messages (idempotent
producer, ``acks=all``). When the broker is slow or down, the in-flight budget is used up, or
the stack paused the intake (a broker rotation), the answer is gRPC ``UNAVAILABLE`` / HTTP 503
with a retry delay, so OTel SDKs retry: nothing is accepted and then dropped. A retried request whose first attempt was partly written is written
twice (at least once); downstream stages are idempotent by span id.

Run it as a process: ``python -m processors.capture.gateway --bootstrap HOST:PORT [--config FILE]``.
"""

from __future__ import annotations

import argparse
import functools
import hmac
import json
import logging
import re
import signal
import threading
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any, Self

import grpc
from confluent_kafka import KafkaError, KafkaException, Producer
from google.protobuf import json_format
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import DecodeError, Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from processors.capture.otlp import hex_ids_to_b64
from processors.config import Config, load_config
from processors.embedded.httpd import HEALTH_PATH, Server, reply
from processors.errors import BrokerError, ConfigError, InputError, PayloadTooLarge

log = logging.getLogger("closeloop.gateway")

TRACE_ID_BYTES = 16
SPAN_ID_BYTES = 8
PROTOBUF = "application/x-protobuf"
JSON = "application/json"
RETRY_AFTER_S = 2  # delay suggested to clients on 503 / UNAVAILABLE
GRPC_WORKERS = 16  # concurrent Export calls; each may wait up to ack_timeout_s
GRPC_MAX_RPCS = 4 * GRPC_WORKERS  # more concurrent calls get RESOURCE_EXHAUSTED (bounds memory)
HTTP_MAX_REQUESTS = 64  # more concurrent HTTP requests get 503 (bounds memory)
HTTP_TIMEOUT_S = 120.0  # socket timeout: a stalled client or idle keep-alive is dropped
# OTLP/JSON nested deeper than this is refused with a 400 before it is parsed (the parsers
# recurse; a kvlist attribute 20 levels deep is about 90 levels of JSON)
MAX_JSON_DEPTH = 128
ENCODINGS = ("", "identity", "gzip")
POLL_INTERVAL_S = 0.05  # producer poll loop: delivery callbacks run on this thread
MESSAGE_OVERHEAD_BYTES = 1 << 20  # producer message.max.bytes = max_request_bytes + this
LIBRDKAFKA_LOG_PERIOD_S = 60.0  # one librdkafka line per facility per period (see _OncePerFacility)


# ---------------------------------------------------------------------------------------------
# Pure core: parse, validate, split. No I/O.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Signal:
    """Field names and message types of one OTLP signal, so traces and logs share one path."""

    name: str  # "traces" | "logs"
    path: str  # HTTP path
    request: type[Message]
    response: type[Message]
    resources: str  # resource_spans | resource_logs
    scopes: str  # scope_spans | scope_logs
    items: str  # spans | log_records
    partial: str  # partial_success field holding the rejected count
    ids_required: bool  # spans must have ids; log records may have none
    service: str  # the gRPC service the signal is exported to


TRACES = Signal(
    name="traces",
    path="/v1/traces",
    request=trace_service_pb2.ExportTraceServiceRequest,
    response=trace_service_pb2.ExportTraceServiceResponse,
    resources="resource_spans",
    scopes="scope_spans",
    items="spans",
    partial="rejected_spans",
    ids_required=True,
    service="opentelemetry.proto.collector.trace.v1.TraceService",
)
LOGS = Signal(
    name="logs",
    path="/v1/logs",
    request=logs_service_pb2.ExportLogsServiceRequest,
    response=logs_service_pb2.ExportLogsServiceResponse,
    resources="resource_logs",
    scopes="scope_logs",
    items="log_records",
    partial="rejected_log_records",
    ids_required=False,
    service="opentelemetry.proto.collector.logs.v1.LogsService",
)
# Metrics: SDKs (``opentelemetry-instrument`` among them) export them by default. closeloop reads
# traces and logs only, so metrics are accepted, counted and dropped: a success answer keeps the
# SDK from logging an export error every few seconds. No ids are read (nothing is written).
METRICS = Signal(
    name="metrics",
    path="/v1/metrics",
    request=metrics_service_pb2.ExportMetricsServiceRequest,
    response=metrics_service_pb2.ExportMetricsServiceResponse,
    resources="resource_metrics",
    scopes="scope_metrics",
    items="metrics",
    partial="rejected_data_points",
    ids_required=False,
    service="opentelemetry.proto.collector.metrics.v1.MetricsService",
)
SIGNALS = {s.path: s for s in (TRACES, LOGS, METRICS)}


@dataclass(frozen=True)
class Split:
    """A request cut into Kafka messages, plus what was rejected inside it (partial success)."""

    messages: list[tuple[bytes | None, bytes]]  # (key, value)
    accepted: int
    rejected: int
    error: str  # partial_success.error_message; "" if none

    def response(self, sig: Signal) -> Message:
        resp = sig.response()
        if self.rejected or self.error:
            ps = resp.partial_success
            setattr(ps, sig.partial, self.rejected)
            ps.error_message = self.error
        return resp


def _id_problem(item: Any, sig: Signal) -> str:
    """Why an item's ids are invalid, or "" when they are fine."""
    tid, sid = item.trace_id, item.span_id
    if sig.ids_required:
        if len(tid) != TRACE_ID_BYTES or not any(tid):
            return f"trace_id must be {TRACE_ID_BYTES} bytes, not all zero (got {len(tid)} bytes)"
        if len(sid) != SPAN_ID_BYTES or not any(sid):
            return f"span_id must be {SPAN_ID_BYTES} bytes, not all zero (got {len(sid)} bytes)"
        psid = item.parent_span_id
        if psid and len(psid) != SPAN_ID_BYTES:
            return f"parent_span_id must be empty or {SPAN_ID_BYTES} bytes (got {len(psid)} bytes)"
        return ""
    if tid and len(tid) != TRACE_ID_BYTES:
        return f"trace_id must be empty or {TRACE_ID_BYTES} bytes (got {len(tid)} bytes)"
    if sid and len(sid) != SPAN_ID_BYTES:
        return f"span_id must be empty or {SPAN_ID_BYTES} bytes (got {len(sid)} bytes)"
    return ""


def split_request(req: Message, sig: Signal) -> Split:
    """One message per (resource, scope, trace id), keyed by the hex trace id.

    This is the collector's grouping (``batchpersignal.SplitTraces``/``SplitLogs``): a trace
    whose spans come from two scopes gives two messages with the same key, in input order.
    Items with invalid ids are left out and counted for the partial-success answer.

    >>> from opentelemetry.proto.trace.v1.trace_pb2 import Span
    >>> req = TRACES.request()
    >>> ss = req.resource_spans.add().scope_spans.add()
    >>> ss.spans.extend([Span(trace_id=b"\\x01" * 16, span_id=b"\\x02" * 8),
    ...                  Span(trace_id=b"bad")])
    >>> s = split_request(req, TRACES)
    >>> [k for k, _ in s.messages], s.accepted, s.rejected
    ([b'01010101010101010101010101010101'], 1, 1)
    """
    messages: list[tuple[bytes | None, bytes]] = []
    accepted = rejected = 0
    first_problem = ""
    for rs in getattr(req, sig.resources):
        for ss in getattr(rs, sig.scopes):
            groups: dict[bytes, list[Any]] = {}
            for item in getattr(ss, sig.items):
                problem = _id_problem(item, sig)
                if problem:
                    rejected += 1
                    first_problem = first_problem or problem
                    continue
                groups.setdefault(bytes(item.trace_id), []).append(item)
            for trace_id, items in groups.items():
                out = sig.request()
                out_rs = getattr(out, sig.resources).add()
                if rs.HasField("resource"):
                    out_rs.resource.CopyFrom(rs.resource)
                out_rs.schema_url = rs.schema_url
                out_ss = getattr(out_rs, sig.scopes).add()
                if ss.HasField("scope"):
                    out_ss.scope.CopyFrom(ss.scope)
                out_ss.schema_url = ss.schema_url
                getattr(out_ss, sig.items).extend(items)
                key = trace_id.hex().encode() if trace_id else None
                messages.append((key, out.SerializeToString()))
                accepted += len(items)
    error = f"{rejected} {sig.items} rejected: {first_problem}" if rejected else ""
    return Split(messages, accepted, rejected, error)


def decode_body(body: bytes, content_encoding: str, limit: int) -> bytes:
    """Undo ``Content-Encoding`` (identity or gzip), never producing more than ``limit`` bytes.

    The limit applies to the decompressed size, so a small gzip bomb cannot blow up memory.
    """
    enc = content_encoding.strip().lower()
    if enc in ("", "identity"):
        if len(body) > limit:
            raise PayloadTooLarge(
                f"request body is {len(body)} bytes, the limit is {limit}", stage="gateway"
            )
        return body
    if enc != "gzip":
        raise InputError(
            f"unsupported Content-Encoding {content_encoding!r}; use gzip or none", stage="gateway"
        )
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as e:
        raise InputError(f"body is not valid gzip: {e}", stage="gateway") from None
    if len(out) > limit:
        raise PayloadTooLarge(
            f"decompressed request body exceeds the limit of {limit} bytes", stage="gateway"
        )
    if not d.eof:
        raise InputError("gzip body is truncated", stage="gateway")
    return out


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.title() for p in rest)


def _each(node: dict[str, Any], snake: str) -> Iterator[Any]:
    """Children under a field named in lowerCamelCase (the spec) or snake_case (accepted too)."""
    for key in (_camel(snake), snake):
        value = node.get(key)
        if isinstance(value, list):
            yield from value
            return


_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")


def json_depth(body: bytes) -> int:
    """How deep arrays and objects nest in JSON ``body`` (brackets inside strings ignored);
    counted without recursion, so any input gets an answer."""
    depth = deepest = 0
    for b in _JSON_STRING.sub(b'""', body).translate(None, _NOT_BRACKET):
        depth += 1 if b in b"[{" else -1
        deepest = max(deepest, depth)
    return deepest


def parse_json(body: bytes, sig: Signal) -> Message:
    """Parse OTLP/JSON: ids are hex (not proto3-JSON base64), unknown fields are ignored."""
    if (depth := json_depth(body)) > MAX_JSON_DEPTH:
        raise InputError(
            f"JSON nested {depth} levels deep; at most {MAX_JSON_DEPTH}", stage="gateway"
        )
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise InputError(f"body is not JSON: {e}", stage="gateway") from None
    if not isinstance(doc, dict):
        raise InputError(
            f"OTLP/JSON body must be an object, got {type(doc).__name__}", stage="gateway"
        )
    for rs in _each(doc, sig.resources):
        for ss in _each(rs, sig.scopes) if isinstance(rs, dict) else ():
            for i, item in enumerate(_each(ss, sig.items) if isinstance(ss, dict) else ()):
                if isinstance(item, dict):
                    hex_ids_to_b64(item, f"{_camel(sig.items)}[{i}]")
    try:
        return json_format.ParseDict(doc, sig.request(), ignore_unknown_fields=True)
    except (json_format.ParseError, RecursionError) as e:
        raise InputError(
            f"body is not an OTLP/JSON {sig.request.__name__}: {e}", stage="gateway"
        ) from None


def parse_body(body: bytes, content_type: str, sig: Signal) -> Message:
    """Parse a decoded OTLP/HTTP body of the given media type into the signal's request."""
    if content_type == JSON:
        return parse_json(body, sig)
    req = sig.request()
    try:
        req.ParseFromString(body)
    except DecodeError as e:
        raise InputError(
            f"body is not a protobuf {sig.request.__name__}: {e}", stage="gateway"
        ) from None
    return req


# ---------------------------------------------------------------------------------------------
# Kafka side: one shared idempotent producer, a poll thread, an in-flight budget.
# ---------------------------------------------------------------------------------------------


class Unavailable(BrokerError):
    """No acknowledgement in time, or the in-flight budget is full: the client should retry."""


# Delivery errors after which a retry can succeed (besides those librdkafka marks retriable):
# the broker is away, or lost our idempotent producer's state (a fatal error: the producer is
# replaced, see KafkaSink._replace_producer).
_RETRYABLE = frozenset(
    {
        KafkaError._MSG_TIMED_OUT,
        KafkaError._TRANSPORT,
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError._PURGE_QUEUE,
        KafkaError._PURGE_INFLIGHT,
        KafkaError._FATAL,
        KafkaError.UNKNOWN_PRODUCER_ID,
        KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER,
        KafkaError.INVALID_PRODUCER_EPOCH,
        *(_FENCED := frozenset({KafkaError.PRODUCER_FENCED, KafkaError._FENCED})),
    }
)


class _OncePerFacility(logging.Filter):
    """librdkafka repeats the same complaint on every reconnect (each second while a broker is
    down): keep one line per facility (FAIL, ERROR, ...) per period; the gateway's own health
    log (one line per transition) says the rest."""

    def __init__(self, period_s: float) -> None:
        super().__init__()
        self.period_s = period_s
        self._last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        facility = str(record.msg).split(" ", 1)[0]
        now = time.monotonic()
        if now - self._last.get(facility, -self.period_s) < self.period_s:
            return False
        self._last[facility] = now
        return True


@functools.cache
def _librdkafka_logger() -> logging.Logger:
    logger = logging.getLogger("closeloop.gateway.kafka")
    logger.addFilter(_OncePerFacility(LIBRDKAFKA_LOG_PERIOD_S))
    return logger


@dataclass
class _Pending:
    """The messages of one request still waiting for their delivery report."""

    remaining: int
    done: threading.Event = field(default_factory=threading.Event)
    error: KafkaError | None = None


def _size(messages: list[tuple[bytes | None, bytes]]) -> int:
    return sum(len(v) + len(k or b"") for k, v in messages)


class KafkaSink:
    """Writes a request's messages and waits until the broker acknowledged all of them."""

    def __init__(
        self,
        bootstrap: str,
        *,
        client_id: str,
        max_inflight_bytes: int,
        ack_timeout_s: float,
        max_message_bytes: int,
    ) -> None:
        if max_inflight_bytes <= 0 or ack_timeout_s <= 0:
            raise ValueError("max_inflight_bytes and ack_timeout_s must be positive")
        self.bootstrap = bootstrap
        self.max_inflight_bytes = max_inflight_bytes
        self.ack_timeout_s = ack_timeout_s
        self._conf = {
            "bootstrap.servers": bootstrap,
            "client.id": client_id,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            # librdkafka gives up on a message after this, so a dead broker frees the budget
            # at about the time the request answers 503.
            "message.timeout.ms": int(ack_timeout_s * 1000),
            "request.timeout.ms": min(30_000, int(ack_timeout_s * 1000)),
            "message.max.bytes": max_message_bytes,
            "queue.buffering.max.kbytes": min(2**31 - 1, max(1, max_inflight_bytes // 1024)),
            "queue.buffering.max.messages": 1_000_000,
            "reconnect.backoff.max.ms": 1000,  # local broker: come back fast after a restart
            "error_cb": self._on_error,
            "logger": _librdkafka_logger(),  # through logging, not raw stderr
        }
        self._producer = Producer(self._conf)
        self._lock = threading.Lock()  # guards _inflight and swapping the producer
        self._inflight = 0
        self._fatal = threading.Event()
        self._down = threading.Event()  # librdkafka said all brokers are down; not yet back
        self._stop = threading.Event()
        self._paused = threading.Event()  # the stack is replacing the broker (a rotation)
        self._healthy = True
        self._thread = threading.Thread(
            target=self._poll_loop, name="gateway-kafka-poll", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    @property
    def inflight_bytes(self) -> int:
        return self._inflight

    def send(self, topic: str, messages: list[tuple[bytes | None, bytes]]) -> None:
        """Produce, then wait for every acknowledgement.

        Raises :class:`Unavailable` (retry later) or :class:`BrokerError` (the broker refused).
        """
        if not messages:
            return
        size = _size(messages)
        pending = _Pending(remaining=len(messages))
        with self._lock:
            # an idle gateway admits any request, so one larger than the budget cannot starve
            if self._paused.is_set():
                raise Unavailable("intake paused while the embedded broker is replaced; retry")
            if self._inflight and self._inflight + size > self.max_inflight_bytes:
                raise Unavailable(
                    f"gateway buffer full ({self._inflight} bytes waiting for the broker)"
                )
            if self._down.is_set():  # answer at once: an SDK must see 503 well inside its timeout
                raise Unavailable(f"broker {self.bootstrap} is unreachable")
            self._inflight += size
            for i, (key, value) in enumerate(messages):
                cb = functools.partial(self._on_delivery, pending, len(value) + len(key or b""))
                try:
                    self._producer.produce(topic, value=value, key=key, on_delivery=cb)
                except BufferError:
                    self._abandon(pending, messages[i:])
                    raise Unavailable("producer queue full") from None
                except KafkaException as e:  # message too large, unknown topic...
                    self._abandon(pending, messages[i:])
                    raise BrokerError(f"cannot produce to {topic}: {e}") from e
        if not pending.done.wait(self.ack_timeout_s):
            self._mark(False, f"no acknowledgement within {self.ack_timeout_s:g}s")
            raise Unavailable(f"broker did not acknowledge within {self.ack_timeout_s:g}s")
        err = pending.error
        self._mark(err is None, err.str() if err else "")
        if err is None:
            return
        if err.code() in _FENCED:
            # after a stall the broker fenced our producer (tansu: "a newer producer with the
            # same transactionalId"): every later write fails the same way until it is replaced
            self._fatal.set()
        if err.retriable() or err.fatal() or err.code() in _RETRYABLE:
            raise Unavailable(f"broker did not acknowledge: {err.str()}")
        raise BrokerError(f"broker refused the write to {topic}: {err.str()}")

    @property
    def paused(self) -> bool:
        return self._paused.is_set()

    @property
    def broker_up(self) -> bool:
        """The broker acknowledged the last writes (no "all brokers down" since)."""
        return self._healthy

    def pause(self) -> None:
        """Answer every request 503 until :meth:`resume` (requests under way still finish)."""
        self._paused.set()

    def idle(self) -> bool:
        """Paused with nothing waiting for an acknowledgement: nothing more will be written."""
        with self._lock:
            return self._paused.is_set() and self._inflight == 0

    def resume(self) -> None:
        """Accept again, through a new producer: the old one's idempotence state belongs to
        the broker that was replaced (a request it still takes answers 503 when it goes)."""
        self._fatal.set()
        self._paused.clear()

    def _abandon(self, pending: _Pending, unsent: list[tuple[bytes | None, bytes]]) -> None:
        """Release the budget of messages never handed to the producer (lock held)."""
        self._inflight -= _size(unsent)
        pending.remaining -= len(unsent)
        if pending.remaining == 0:
            pending.done.set()

    def _on_delivery(
        self, pending: _Pending, nbytes: int, err: KafkaError | None, _msg: Any
    ) -> None:
        with self._lock:
            self._inflight -= nbytes
            if err is not None and pending.error is None:
                pending.error = err
            pending.remaining -= 1
            if pending.remaining == 0:
                pending.done.set()

    def _on_error(self, err: KafkaError) -> None:
        if err.code() == KafkaError._ALL_BROKERS_DOWN:
            self._down.set()
            self._mark(False, err.str())
        if err.fatal():
            log.error("kafka producer fatal error, replacing the producer: %s", err.str())
            self._fatal.set()
        else:
            log.debug("kafka producer: %s", err.str())

    def _mark(self, ok: bool, why: str) -> None:
        """Log broker health transitions once, not once per request."""
        if ok != self._healthy:
            self._healthy = ok
            if ok:
                log.info("broker %s acknowledges writes again", self.bootstrap)
            else:
                log.warning(
                    "broker %s unavailable, answering 503/UNAVAILABLE: %s", self.bootstrap, why
                )

    def _poll_loop(self) -> None:
        while not self._stop.is_set():
            if self._fatal.is_set():
                self._replace_producer()
            if self._down.is_set():
                self._probe()
            try:
                self._producer.poll(POLL_INTERVAL_S)
            except KafkaException as e:  # fatal errors are raised here too, e.g. from a new
                self._on_error(e.args[0])  # broker that does not know our idempotent producer id

    def _probe(self) -> None:
        """While every broker is down, ask for metadata (librdkafka reports no "up" event).
        At the first answer, start over with a new producer (the old one's idempotence state
        belongs to the broker that went away, and it stalls on a restarted one), then let
        requests through again."""
        try:
            if not self._producer.list_topics(timeout=1.0).brokers:
                return
        except KafkaException:
            return
        self._replace_producer()
        self._down.clear()

    def _replace_producer(self) -> None:
        """After a fatal error (idempotence state lost) only a new producer can write again."""
        with self._lock:
            old, self._producer = self._producer, Producer(self._conf)
            self._fatal.clear()
        old.purge()
        old.flush(1.0)  # serves the _PURGE_* reports: waiting requests answer 503, budget freed

    def close(self, timeout_s: float) -> None:
        """Stop the poll thread, then flush what is queued (within ``timeout_s``)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        left = self._producer.flush(timeout_s)
        if left:
            log.warning("%d messages were not acknowledged at shutdown", left)


# ---------------------------------------------------------------------------------------------
# The two front doors, and the Gateway that owns them.
# ---------------------------------------------------------------------------------------------

OK, BAD_REQUEST, TOO_LARGE, UNAVAILABLE, FAILED, UNAUTHORIZED = (
    "ok",
    "bad_request",
    "too_large",
    "unavailable",
    "failed",
    "unauthorized",
)  # outcome_* counters
UNAUTHORIZED_MESSAGE = (
    "missing or wrong bearer token (otlp.bearer_token): send the header "
    "authorization: Bearer <token>, e.g. OTEL_EXPORTER_OTLP_HEADERS='authorization=Bearer <token>'"
)


class Gateway:
    """The OTLP gateway: gRPC on ``cfg.otlp.grpc_port``, HTTP on ``cfg.otlp.http_port``.

    Port 0 picks a free port; ``grpc_port`` / ``http_port`` hold the bound ports after
    :meth:`start`. Usable as a context manager.
    """

    def __init__(self, cfg: Config, bootstrap: str) -> None:
        self.cfg = cfg
        self.bootstrap = bootstrap
        self.grpc_port = cfg.otlp.grpc_port
        self.http_port = cfg.otlp.http_port
        self._topics = {TRACES.name: cfg.topics.otlp_spans, LOGS.name: cfg.topics.otlp_logs}
        self._stats: Counter[str] = Counter()
        self._stats_lock = threading.Lock()
        self._sink: KafkaSink | None = None
        self._grpc: grpc.Server | None = None
        self._http: Server | None = None

    # -- lifecycle --

    def start(self) -> None:
        """Bind both ports (``ConfigError`` if one is taken), connect the producer, serve."""
        o = self.cfg.otlp
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=GRPC_WORKERS, thread_name_prefix="gateway-grpc"),
            maximum_concurrent_rpcs=GRPC_MAX_RPCS,
            # grpc itself answers RESOURCE_EXHAUSTED above this (decompressed) size; no
            # SO_REUSEPORT, so a second gateway on the same port fails instead of sharing it
            options=[
                ("grpc.max_receive_message_length", o.max_request_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        server.add_generic_rpc_handlers([_grpc_service(self, sig) for sig in SIGNALS.values()])
        try:
            grpc_port = server.add_insecure_port(f"{o.host}:{o.grpc_port}")
        except RuntimeError:  # recent grpcio raises instead of returning 0
            grpc_port = 0
        if grpc_port == 0:
            raise ConfigError(
                "otlp.grpc_port",
                f"cannot listen on {o.host}:{o.grpc_port}",
                "choose a free port (CLOSELOOP_OTLP_GRPC_PORT), or 0 for any",
            )
        try:
            http = Server((o.host, o.http_port), _make_handler(self))
        except OSError as e:
            server.stop(0)
            raise ConfigError(
                "otlp.http_port",
                f"cannot listen on {o.host}:{o.http_port}: {e}",
                "choose a free port (CLOSELOOP_OTLP_HTTP_PORT), or 0 for any",
            ) from None
        self._sink = KafkaSink(
            self.bootstrap,
            client_id=f"{self.cfg.kafka.client_id}-gateway",
            max_inflight_bytes=o.max_inflight_bytes,
            ack_timeout_s=o.ack_timeout_s,
            max_message_bytes=o.max_request_bytes + MESSAGE_OVERHEAD_BYTES,
        )
        self._sink.start()
        self._grpc, self._http = server, http
        self.grpc_port, self.http_port = grpc_port, http.server_address[1]
        server.start()
        http.start("gateway-http")
        log.info(
            "OTLP gateway: gRPC %s:%d, HTTP http://%s:%d -> kafka %s (topics %s, %s)",
            o.host,
            self.grpc_port,
            o.host,
            self.http_port,
            self.bootstrap,
            self._topics["traces"],
            self._topics["logs"],
        )

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop accepting, let running requests finish (within ``grace_s``), flush the producer."""
        if self._http is not None:
            self._http.stop()
        if self._grpc is not None:
            self._grpc.stop(grace_s).wait(grace_s)
        if self._sink is not None:
            self._sink.close(grace_s)
            log.info("OTLP gateway stopped: %s", self.stats())
        self._http = self._grpc = self._sink = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def pause(self, on: bool) -> None:
        """Pause (503 to everything) or resume the intake (the stack's broker rotation)."""
        if self._sink is not None and on != self._sink.paused:
            self._sink.pause() if on else self._sink.resume()
            log.warning("intake %s", "paused: the broker is being replaced" if on else "resumed")

    def paused_idle(self) -> bool:
        """Paused, and every request it accepted is acknowledged or answered 503."""
        return self._sink is not None and self._sink.idle()

    def health(self) -> dict[str, str]:
        """What ``GET /healthz`` says: the intake ``accepting``, ``paused`` (a broker rotation)
        or ``broker unavailable`` (requests get 503 with Retry-After)."""
        sink = self._sink
        if sink is None:
            return {"status": "stopped"}
        if sink.paused:
            return {"status": "paused"}
        return {"status": "accepting" if sink.broker_up else "broker unavailable"}

    def stats(self) -> dict[str, int]:
        """Counters: ``{traces,logs,metrics}_requests``, ``spans``, ``log_records``,
        ``rejected_*``, ``messages``, ``metrics_dropped``, ``outcome_*`` per answer kind; and the
        ``inflight_bytes`` gauge."""
        with self._stats_lock:
            out = dict(self._stats)
        out["inflight_bytes"] = self._sink.inflight_bytes if self._sink is not None else 0
        return out

    # -- the path both transports share --

    def _count(self, deltas: dict[str, int]) -> None:
        with self._stats_lock:
            self._stats.update(deltas)

    def outcome(self, kind: str) -> None:
        self._count({f"outcome_{kind}": 1})

    def authorized(self, authorization: str) -> bool:
        """Whether an ``Authorization`` value carries the configured bearer token (always
        true when none is configured); compared in constant time."""
        token = self.cfg.otlp.bearer_token
        if not token:
            return True
        scheme, _, value = authorization.strip().partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            value.strip().encode(), token.encode()
        )

    def export(self, req: Message, sig: Signal) -> Message:
        """Split, write, wait for the acks; return the Export response (partial success inside)."""
        if self._sink is None:
            raise BrokerError("the gateway is not started")
        if sig is METRICS:  # accepted, counted, dropped (see METRICS)
            n = sum(len(sm.metrics) for rm in req.resource_metrics for sm in rm.scope_metrics)
            self._count({"metrics_requests": 1, "metrics_dropped": n})
            return sig.response()
        split = split_request(req, sig)
        if split.rejected:
            log.info("%s: %s", sig.name, split.error)
        self._sink.send(self._topics[sig.name], split.messages)
        self._count(
            {
                f"{sig.name}_requests": 1,
                sig.items: split.accepted,
                f"rejected_{sig.items}": split.rejected,
                "messages": len(split.messages),
            }
        )
        return split.response(sig)


def _grpc_export(
    gw: Gateway, sig: Signal, request: Message, context: grpc.ServicerContext
) -> Message:
    try:
        resp = gw.export(request, sig)
    except Unavailable as e:
        gw.outcome(UNAVAILABLE)
        delay = error_details_pb2.RetryInfo(retry_delay=Duration(seconds=RETRY_AFTER_S))
        status = status_pb2.Status(code=code_pb2.UNAVAILABLE, message=str(e))
        status.details.add().Pack(delay)
        context.set_trailing_metadata(
            (
                # the standard place (Go SDK, collector), and where the Python SDK looks
                ("grpc-status-details-bin", status.SerializeToString()),
                ("google.rpc.retryinfo-bin", delay.SerializeToString()),
            )
        )
        context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
    except BrokerError as e:
        gw.outcome(FAILED)
        log.error("%s export failed: %s", sig.name, e)
        context.abort(grpc.StatusCode.INTERNAL, str(e))
    gw.outcome(OK)
    return resp


def _grpc_service(gw: Gateway, sig: Signal) -> grpc.GenericRpcHandler:
    """The signal's ``Export`` method, taking the request as bytes: an undecodable request is
    the client's error (INVALID_ARGUMENT), which grpc's own deserializer would report as
    INTERNAL; and the bearer token, when one is set, is checked before the body is read."""

    def export(raw: bytes, context: grpc.ServicerContext) -> Message:
        if not gw.authorized(dict(context.invocation_metadata()).get("authorization", "")):
            gw.outcome(UNAUTHORIZED)
            context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHORIZED_MESSAGE)
        request = sig.request()
        try:
            request.ParseFromString(raw)
        except DecodeError as e:
            gw.outcome(BAD_REQUEST)
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"not a protobuf {sig.request.__name__}: {e}"
            )
        return _grpc_export(gw, sig, request, context)

    method = grpc.unary_unary_rpc_method_handler(
        export, response_serializer=lambda m: m.SerializeToString()
    )
    return grpc.method_handlers_generic_handler(sig.service, {"Export": method})


NO_SUCH_PATH = "no such path {}; use /v1/traces or /v1/logs (/v1/metrics is accepted and dropped)"


TOO_LARGE_HINT = "(otlp.max_request_bytes); send smaller batches"


def _make_handler(gw: Gateway) -> type[BaseHTTPRequestHandler]:
    """The OTLP/HTTP handler class of one gateway (http.server makes a handler per request)."""
    return type(
        "Handler",
        (OtlpHttpHandler,),
        {
            "gw": gw,
            "limit": gw.cfg.otlp.max_request_bytes,
            "slots": threading.BoundedSemaphore(HTTP_MAX_REQUESTS),
        },
    )


class OtlpHttpHandler(BaseHTTPRequestHandler):
    """OTLP/HTTP: POST /v1/traces, /v1/logs (and /v1/metrics, dropped) in protobuf or JSON."""

    gw: Gateway
    limit: int
    slots: threading.BoundedSemaphore
    protocol_version = "HTTP/1.1"  # keep-alive: SDK exporters reuse connections
    server_version = "closeloop-gateway"
    timeout = HTTP_TIMEOUT_S

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http %s " + format, self.client_address[0], *args)

    def _reply(
        self, code: int, body: bytes, ctype: str, headers: dict[str, str] | None = None
    ) -> None:
        close = {"Connection": "close"} if self.close_connection else {}
        reply(self, code, body, {"Content-Type": ctype, **(headers or {}), **close})

    def _status(
        self,
        code: int,
        rpc_code: int,
        message: str,
        ctype: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        """An error answer: a google.rpc.Status in the request's encoding (OTLP/HTTP)."""
        status = status_pb2.Status(code=rpc_code, message=message)
        if ctype == JSON:
            body = json_format.MessageToJson(status, indent=None).encode()
        else:
            body = status.SerializeToString()
        self._reply(code, body, ctype, headers)

    def _not_post(self) -> None:
        self.close_connection = True  # a body, if any, was not read
        if self.path.split("?", 1)[0] in SIGNALS:
            self._status(
                405,
                code_pb2.UNIMPLEMENTED,
                f"{self.command} not allowed; use POST",
                PROTOBUF,
                {"Allow": "POST"},
            )
        else:
            self._status(404, code_pb2.NOT_FOUND, NO_SUCH_PATH.format(self.path), PROTOBUF)

    do_PUT = do_DELETE = do_PATCH = _not_post

    def do_GET(self) -> None:
        """``/healthz``: 200 whenever the process serves (a liveness probe: the embedded
        supervisor restarts a gateway that stops answering it), with the intake's state; no
        credential, nothing of the store."""
        if self.path.split("?", 1)[0] != HEALTH_PATH:
            return self._not_post()
        self._reply(200, json.dumps(self.gw.health()).encode(), JSON)

    def do_POST(self) -> None:
        sig = SIGNALS.get(self.path.split("?", 1)[0])
        ctype = (self.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        reply_ctype = JSON if ctype == JSON else PROTOBUF
        length = self.headers.get("Content-Length") or ""
        if self._refused(sig, ctype, reply_ctype, length) or sig is None:
            return
        if not self.slots.acquire(blocking=False):
            self.close_connection = True
            self.gw.outcome(UNAVAILABLE)
            return self._status(
                503,
                code_pb2.UNAVAILABLE,
                f"more than {HTTP_MAX_REQUESTS} requests at once",
                reply_ctype,
                {"Retry-After": str(RETRY_AFTER_S)},
            )
        try:
            self._export(sig, ctype, reply_ctype, int(length))
        finally:
            self.slots.release()

    def _refused(self, sig: Signal | None, ctype: str, reply_ctype: str, length: str) -> bool:
        """Answer a request whose headers already decide it (credential, encoding, path, type,
        length, size) and say so; the body of a refused request is never read."""
        if not self.gw.authorized(self.headers.get("Authorization") or ""):
            self.close_connection = True
            self.gw.outcome(UNAUTHORIZED)
            self._status(
                401,
                code_pb2.UNAUTHENTICATED,
                UNAUTHORIZED_MESSAGE,
                reply_ctype,
                {"WWW-Authenticate": "Bearer"},
            )
            return True
        encoding = (self.headers.get("Content-Encoding") or "").strip().lower()
        if sig is not None and encoding not in ENCODINGS:
            self.close_connection = True
            self.gw.outcome(BAD_REQUEST)
            self._status(
                415,
                code_pb2.INVALID_ARGUMENT,
                f"unsupported Content-Encoding {encoding!r}; use gzip or none",
                reply_ctype,
                {"Accept-Encoding": "gzip"},
            )
            return True
        if sig is None or ctype not in (PROTOBUF, JSON) or not length.isdigit():
            self.close_connection = True
            if sig is None:
                self._status(404, code_pb2.NOT_FOUND, NO_SUCH_PATH.format(self.path), reply_ctype)
            elif ctype not in (PROTOBUF, JSON):
                self._status(
                    415,
                    code_pb2.INVALID_ARGUMENT,
                    f"unsupported Content-Type {ctype!r}; use {PROTOBUF} or {JSON}",
                    PROTOBUF,
                )
            else:
                self._status(
                    411, code_pb2.INVALID_ARGUMENT, "Content-Length is required", reply_ctype
                )
            return True
        if int(length) > self.limit:
            self.close_connection = True
            self.gw.outcome(TOO_LARGE)
            self._status(
                413,
                code_pb2.RESOURCE_EXHAUSTED,
                f"request body is {length} bytes, the limit is {self.limit} " + TOO_LARGE_HINT,
                reply_ctype,
            )
            return True
        return False

    def _export(self, sig: Signal, ctype: str, reply_ctype: str, length: int) -> None:
        try:
            raw = self.rfile.read(length)
        except OSError as e:  # stalled past HTTP_TIMEOUT_S, or reset
            self.close_connection = True
            log.info("dropped %s request from %s mid-body: %s", sig.name, self.client_address[0], e)
            return None
        if len(raw) < length:  # the client closed early: nothing to answer
            self.close_connection = True
            return None
        try:
            body = decode_body(raw, self.headers.get("Content-Encoding") or "", self.limit)
            resp = self.gw.export(parse_body(body, ctype, sig), sig)
        except PayloadTooLarge as e:
            self.gw.outcome(TOO_LARGE)
            return self._status(
                413, code_pb2.RESOURCE_EXHAUSTED, f"{e.reason} {TOO_LARGE_HINT}", reply_ctype
            )
        except InputError as e:
            self.gw.outcome(BAD_REQUEST)
            log.info("bad %s request from %s: %s", sig.name, self.client_address[0], e.reason)
            return self._status(400, code_pb2.INVALID_ARGUMENT, e.reason, reply_ctype)
        except Unavailable as e:
            self.gw.outcome(UNAVAILABLE)
            return self._status(
                503,
                code_pb2.UNAVAILABLE,
                str(e),
                reply_ctype,
                {"Retry-After": str(RETRY_AFTER_S)},
            )
        except BrokerError as e:
            self.gw.outcome(FAILED)
            log.error("%s export failed: %s", sig.name, e)
            return self._status(500, code_pb2.INTERNAL, str(e), reply_ctype)
        self.gw.outcome(OK)
        if reply_ctype == JSON:
            self._reply(200, json_format.MessageToJson(resp, indent=None).encode(), JSON)
        else:
            self._reply(200, resp.SerializeToString(), PROTOBUF)


# ---------------------------------------------------------------------------------------------
# Process entry point (started by `closeloop up` as a child process).
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """``python -m processors.capture.gateway --bootstrap HOST:PORT [--config F] [--grpc-port N] ...``.

    Prints ``gateway ready grpc=HOST:PORT http=HOST:PORT`` once listening; stops on SIGTERM/SIGINT.
    SIGUSR1 pauses the intake (503 to every request) and SIGUSR2 resumes it: the stack's broker
    rotation; ``run/gateway.json`` says ``"paused": true`` once the broker acknowledged all it
    accepted.
    """
    from processors.embedded.broker import ensure_topics
    from processors.embedded.procs import write_run_file
    from processors.heartbeat import dump_stacks_on_signal

    dump_stacks_on_signal()
    p = argparse.ArgumentParser(
        prog="python -m processors.capture.gateway",
        description="closeloop's OTLP gateway: OTLP in, Kafka out",
    )
    p.add_argument("--config", help="closeloop.yaml (default: CLOSELOOP_CONFIG, ./closeloop.yaml)")
    p.add_argument("--bootstrap", help="Kafka bootstrap servers (default: kafka.bootstrap)")
    p.add_argument("--grpc-port", type=int, help="OTLP/gRPC port (default: otlp.grpc_port)")
    p.add_argument("--http-port", type=int, help="OTLP/HTTP port (default: otlp.http_port)")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    cfg = load_config(
        args.config, overrides={"otlp.grpc_port": args.grpc_port, "otlp.http_port": args.http_port}
    )
    bootstrap = args.bootstrap or cfg.kafka.bootstrap
    if not bootstrap:
        p.error(
            "no Kafka to write to: pass --bootstrap HOST:PORT or set kafka.bootstrap "
            "(CLOSELOOP_KAFKA)"
        )
    ensure_topics(bootstrap, [cfg.topics.otlp_spans, cfg.topics.otlp_logs], cfg.kafka.partitions)
    stop = threading.Event()
    pause = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    signal.signal(signal.SIGUSR1, lambda *_: pause.set())
    signal.signal(signal.SIGUSR2, lambda *_: pause.clear())
    gw = Gateway(cfg, bootstrap)
    gw.start()
    ports = {"grpc_port": gw.grpc_port, "http_port": gw.http_port}
    # the ports bound, for the stack's supervisor (it publishes these, not the ones asked for)
    write_run_file(cfg.run_dir(), "gateway.json", {**ports, "paused": False})
    # one parseable line for the supervisor (the ports matter when 0 was asked for)
    print(
        f"gateway ready grpc={cfg.otlp.host}:{gw.grpc_port} http={cfg.otlp.host}:{gw.http_port}",
        flush=True,
    )
    published = False
    while not stop.wait(POLL_INTERVAL_S):
        gw.pause(pause.is_set())
        if gw.paused_idle() != published:
            published = not published
            write_run_file(cfg.run_dir(), "gateway.json", {**ports, "paused": published})
    gw.stop()
    (cfg.run_dir() / "gateway.json").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
