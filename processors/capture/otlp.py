"""Decoding of OTLP export requests as they sit on Kafka (protobuf or OTLP/JSON).

The collector's kafka exporter writes ``otlp_proto`` (the protobuf
``Export*ServiceRequest``) or ``otlp_json``. OTLP/JSON differs from protobuf's own
JSON mapping in one way that matters here: trace and span ids are hex, not base64.
JSON requests are parsed span by span (log record by log record) so that one bad
item is reported and skipped while the rest of the request goes through.
"""

from __future__ import annotations

import base64
import json
import math
import re
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from processors.errors import InputError

# the fields of a span, a link or a log record that hold ids, in both spellings json_format reads
_ID_KEYS = ("traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id")

# (where, reason) of an item that could not be decoded
Problem = tuple[str, str]


def is_json(value: bytes) -> bool:
    """OTLP/JSON starts with '{'; a protobuf export request never does (0x7b is not a valid tag)."""
    return value.lstrip()[:1] == b"{"


def decode_traces(value: bytes) -> tuple[ExportTraceServiceRequest, list[Problem]]:
    """Decode an ``ExportTraceServiceRequest``; raise :class:`InputError` if it cannot be read at all."""
    if is_json(value):
        return _from_json(value, ExportTraceServiceRequest, "resourceSpans", "scopeSpans", "spans")
    return _from_proto(value, ExportTraceServiceRequest), []


def decode_logs(value: bytes) -> tuple[ExportLogsServiceRequest, list[Problem]]:
    """Decode an ``ExportLogsServiceRequest``; raise :class:`InputError` if it cannot be read at all."""
    if is_json(value):
        return _from_json(
            value, ExportLogsServiceRequest, "resourceLogs", "scopeLogs", "logRecords"
        )
    return _from_proto(value, ExportLogsServiceRequest), []


def _from_proto(value: bytes, cls: type[Message]) -> Any:
    try:
        return cls.FromString(value)
    except (DecodeError, RuntimeError, ValueError) as e:  # upb raises DecodeError; be safe
        raise InputError("not an OTLP protobuf request", detail=f"{cls.__name__}: {e}") from None


def _from_json(
    value: bytes, cls: type[Message], top: str, mid: str, leaf: str
) -> tuple[Any, list[Problem]]:
    """Build the request piece by piece: resource and scope must parse, each leaf item may fail alone."""
    try:
        doc = json.loads(value)
    except (ValueError, RecursionError) as e:
        raise InputError("invalid JSON", detail=str(e)[:200]) from None
    if (
        not isinstance(doc, dict)
        or not isinstance(doc.get(top, []), list)
        or (doc and top not in doc)
    ):
        raise InputError(
            "JSON is not an OTLP request", detail=f"expected an object with a list {top!r}"
        )
    req = cls()
    problems: list[Problem] = []
    for i, rd in enumerate(doc.get(top) or []):
        if not isinstance(rd, dict) or not isinstance(rd.get(mid, []), list):
            raise InputError(
                "JSON is not an OTLP request", detail=f"{top}[{i}] is not an object with {mid!r}"
            )
        r = getattr(req, _snake(top)).add()
        _parse(rd.get("resource") or {}, r.resource, f"{top}[{i}].resource")
        for j, sd in enumerate(rd.get(mid) or []):
            if not isinstance(sd, dict) or not isinstance(sd.get(leaf, []), list):
                raise InputError(
                    "JSON is not an OTLP request", detail=f"{top}[{i}].{mid}[{j}] is malformed"
                )
            s = getattr(r, _snake(mid)).add()
            _parse(sd.get("scope") or {}, s.scope, f"{top}[{i}].{mid}[{j}].scope")
            items = getattr(s, _snake(leaf))
            for k, item in enumerate(sd.get(leaf) or []):
                where = f"{top}[{i}].{mid}[{j}].{leaf}[{k}]"
                msg = items.add()
                try:
                    if not isinstance(item, dict):
                        raise InputError("not an object")
                    hex_ids_to_b64(item, where)
                    _parse(item, msg, where)
                except InputError as e:
                    del items[-1]
                    problems.append((where, e.reason))
    return req, problems


def _parse(d: Any, msg: Message, where: str) -> None:
    try:
        json_format.ParseDict(d, msg, ignore_unknown_fields=True)
    except (json_format.ParseError, ValueError, TypeError, AttributeError, RecursionError) as e:
        raise InputError(f"invalid OTLP/JSON at {where}", detail=str(e)[:300]) from None


def hex_ids_to_b64(item: dict[str, Any], where: str) -> None:
    """Rewrite, in place, the ids of an OTLP/JSON span or log record (and of its links) from
    hex, as OTLP/JSON has them, to base64, as protobuf's JSON mapping reads bytes; an id that is
    not hex raises :class:`InputError` naming it. Ids of a wrong length are left for the id
    checks downstream to reject.

    >>> span = {"traceId": "00" * 16, "links": [{"spanId": "ff" * 8}]}
    >>> hex_ids_to_b64(span, "spans[0]")
    >>> span
    {'traceId': 'AAAAAAAAAAAAAAAAAAAAAA==', 'links': [{'spanId': '//////////8='}]}
    """
    for key in _ID_KEYS:
        if key in item:
            item[key] = _hex_to_b64(item[key], f"{where}.{key}")
    links = item.get("links")
    for j, link in enumerate(links if isinstance(links, list) else []):
        if isinstance(link, dict):
            hex_ids_to_b64(link, f"{where}.links[{j}]")


def _hex_to_b64(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise InputError(f"{where} must be a hex string, got {type(value).__name__}")
    try:
        return base64.b64encode(bytes.fromhex(value)).decode()
    except ValueError:
        raise InputError(f"{where} is not hex: {value[:40]!r}") from None


def _snake(name: str) -> str:
    return re.sub(r"[A-Z]", lambda m: "_" + m.group(0).lower(), name)


def any_value(v: AnyValue) -> Any:
    """An OTLP ``AnyValue`` as plain Python (bytes as base64 text, non-finite doubles as text)."""
    w = v.WhichOneof("value")
    if w == "string_value":
        return v.string_value
    if w == "int_value" or w == "bool_value":
        return getattr(v, w)
    if w == "double_value":
        d = v.double_value
        return d if math.isfinite(d) else str(d)
    if w == "array_value":
        return [any_value(x) for x in v.array_value.values]
    if w == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in v.kvlist_value.values}
    if w == "bytes_value":
        return base64.b64encode(v.bytes_value).decode()
    return None
