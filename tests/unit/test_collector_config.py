"""collector-config.yaml: otelcol-contrib-valid, feeds what the processors read, never samples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from processors.config import TopicsConfig

CONFIG = Path(__file__).resolve().parents[2] / "collector-config.yaml"

# Component *types* (the names used in a config) that otelcol-contrib ships, by kind: the subset
# a closeloop deployment could reasonably use. Source: the otelcol-contrib distribution manifest,
# github.com/open-telemetry/opentelemetry-collector-releases
#   distributions/otelcol-contrib/manifest.yaml (v0.135.0),
# cross-checked with opentelemetry-collector-contrib cmd/otelcontribcol/builder-config.yaml.
# Module -> type: otlpreceiver -> otlp, kafkaexporter -> kafka, memorylimiterprocessor ->
# memory_limiter, healthcheckextension -> health_check, filestorage -> file_storage, ...
OTELCOL_CONTRIB: dict[str, set[str]] = {
    "receivers": {
        "otlp",
        "kafka",
        "filelog",
        "prometheus",
        "hostmetrics",
        "zipkin",
        "jaeger",
        "nop",
    },
    "processors": {
        "batch",
        "memory_limiter",
        "attributes",
        "resource",
        "resourcedetection",
        "filter",
        "transform",
        "redaction",
        "groupbytrace",
        "k8sattributes",
        "span",
        "probabilistic_sampler",
        "tail_sampling",
    },
    "exporters": {
        "kafka",
        "otlp",
        "otlphttp",
        "debug",
        "nop",
        "file",
        "clickhouse",
        "loadbalancing",
    },
    "extensions": {
        "health_check",
        "pprof",
        "zpages",
        "file_storage",
        "basicauth",
        "bearertokenauth",
    },
    "connectors": {"forward", "routing", "spanmetrics", "count"},
}
SAMPLERS = {"probabilistic_sampler", "tail_sampling"}


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    data = yaml.safe_load(CONFIG.read_text())
    assert isinstance(data, dict)
    return data


def _type(component_id: str) -> str:
    """``kafka/spans`` -> ``kafka``: the part before the slash is the component type."""
    return component_id.split("/", 1)[0]


def _referenced(doc: dict[str, Any]) -> list[tuple[str, str]]:
    service = doc["service"]
    refs = [("extensions", e) for e in service.get("extensions", [])]
    for pipeline in service["pipelines"].values():
        for kind in ("receivers", "processors", "exporters"):
            refs += [(kind, c) for c in pipeline.get(kind, [])]
    return refs


def test_pipelines_for_traces_and_logs(doc: dict[str, Any]) -> None:
    pipelines = doc["service"]["pipelines"]
    assert set(pipelines) == {"traces", "logs"}
    for p in pipelines.values():
        assert p["receivers"] == ["otlp"]
        assert p["exporters"] == ["kafka"]
        # memory_limiter must run first to protect the collector, batch last before export
        assert p["processors"][0] == "memory_limiter"
        assert p["processors"][-1] == "batch"


@pytest.mark.parametrize("kind", ["receivers", "processors", "exporters", "extensions"])
def test_every_reference_is_defined(doc: dict[str, Any], kind: str) -> None:
    defined = set(doc.get(kind) or {})
    used = {c for k, c in _referenced(doc) if k == kind}
    assert used, f"no {kind} referenced"
    assert used <= defined, f"{kind} used but not defined: {sorted(used - defined)}"


@pytest.mark.parametrize(
    "kind", ["receivers", "processors", "exporters", "extensions", "connectors"]
)
def test_every_component_ships_with_otelcol_contrib(doc: dict[str, Any], kind: str) -> None:
    unknown = {_type(c) for c in doc.get(kind) or {}} - OTELCOL_CONTRIB[kind]
    assert not unknown, f"{kind} not in otelcol-contrib: {sorted(unknown)}"


def test_no_sampling_anywhere(doc: dict[str, Any]) -> None:
    def keys(node: Any) -> set[str]:
        if isinstance(node, dict):
            return {_type(str(k)) for k in node} | {k for v in node.values() for k in keys(v)}
        if isinstance(node, list):
            names = {_type(v) for v in node if isinstance(v, str)}
            return names | {k for v in node for k in keys(v)}
        return set()

    assert not keys(doc) & SAMPLERS
    assert "sampl" not in "".join(line.split("#", 1)[0] for line in CONFIG.read_text().splitlines())


def test_kafka_exporter_writes_what_the_processors_read(doc: dict[str, Any]) -> None:
    kafka = doc["exporters"]["kafka"]
    topics = TopicsConfig()
    assert kafka["traces"] == {"topic": topics.otlp_spans, "encoding": "otlp_proto"}
    assert kafka["logs"] == {"topic": topics.otlp_logs, "encoding": "otlp_proto"}
    # the deprecated top-level form must not linger next to the per-signal blocks
    assert "topic" not in kafka and "encoding" not in kafka
    assert kafka["partition_traces_by_id"] is True
    assert kafka["partition_logs_by_trace_id"] is True


def test_kafka_exporter_does_not_lose_acknowledged_data(doc: dict[str, Any]) -> None:
    kafka = doc["exporters"]["kafka"]
    assert kafka["producer"]["required_acks"] == -1
    assert kafka["producer"]["compression"] in {"none", "gzip", "snappy", "lz4", "zstd"}
    assert kafka["retry_on_failure"]["enabled"] is True
    assert kafka["sending_queue"]["enabled"] is True
    assert kafka["brokers"] == "${env:KAFKA_BROKERS:-kafka:9092}"


def test_receivers_listen_on_the_standard_ports(doc: dict[str, Any]) -> None:
    protocols = doc["receivers"]["otlp"]["protocols"]
    assert protocols["grpc"]["endpoint"] == "0.0.0.0:4317"
    assert protocols["http"]["endpoint"] == "0.0.0.0:4318"
    assert doc["service"]["extensions"] == ["health_check"]
