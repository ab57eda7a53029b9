"""collector-config.yaml: otelcol-contrib-valid, feeds what the processors read, never samples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from processors.config import TopicsConfig

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "collector-config.yaml"
COMPOSE = ROOT / "docker-compose.yml"
# The configuration keys of the pinned release (origin and version in the file's header).
KEYS = ROOT / "tests" / "data" / "otelcol-contrib-config-keys.yaml"
IMAGE = "otel/opentelemetry-collector-contrib"

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
        # memory_limiter must run first to protect the collector; batching is the exporter's
        # sending_queue, not the `batch` processor contrib is retiring
        assert p["processors"][0] == "memory_limiter"
        assert "batch" not in p["processors"]


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


def _unknown_keys(config: Any, known: Any, where: str) -> list[str]:
    """Paths in ``config`` that the release's structs (``known``) do not have."""
    if not isinstance(config, dict | list) or (isinstance(known, dict) and "*" in known):
        return []  # a scalar, or anything in a free-form map
    if isinstance(config, list):
        items = known.get("[]") if isinstance(known, dict) else None
        return [p for i, v in enumerate(config) for p in _unknown_keys(v, items, f"{where}[{i}]")]
    if not isinstance(known, dict) or set(known) == {"[]"}:
        return [f"{where} (a struct here, a scalar or list in the release)"]
    out = []
    for key, value in config.items():
        if key not in known:
            out.append(f"{where}.{key}")
        else:
            out += _unknown_keys(value, known[key], f"{where}.{key}")
    return out


@pytest.fixture(scope="module")
def release() -> dict[str, Any]:
    data = yaml.safe_load(KEYS.read_text())
    assert isinstance(data, dict)
    return data


def test_compose_pins_the_release_the_keys_come_from(release: dict[str, Any]) -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    image = services["collector"]["image"]
    name, _, tag = image.partition(":")
    assert name == IMAGE
    assert tag == str(release["version"]), (
        f"docker-compose.yml pins {tag}, the key list is of {release['version']}: "
        "regenerate tests/data/otelcol-contrib-config-keys.yaml from that release's source"
    )


def test_every_configured_component_has_its_key_list(
    doc: dict[str, Any], release: dict[str, Any]
) -> None:
    for kind in ("receivers", "processors", "exporters", "extensions"):
        types = {_type(c) for c in doc.get(kind) or {}}
        assert types <= set(release["components"].get(kind, {})), kind


@pytest.mark.parametrize("kind", ["receivers", "processors", "exporters", "extensions"])
def test_every_key_is_known_to_the_pinned_release(
    doc: dict[str, Any], release: dict[str, Any], kind: str
) -> None:
    unknown = []
    for component_id, config in (doc.get(kind) or {}).items():
        known = release["components"][kind][_type(component_id)]
        unknown += _unknown_keys(config or {}, known, f"{kind}.{component_id}")
    assert not unknown, f"keys otelcol-contrib {release['version']} would refuse: {unknown}"


def test_the_key_check_catches_drift(release: dict[str, Any]) -> None:
    """A key the release lacks (a typo, or a key from a later release) and a struct where the
    release has a scalar both fail; the keys this config relies on are in the list."""
    kafka = release["components"]["exporters"]["kafka"]
    assert _unknown_keys({"partition_logs_by_traceid": True}, kafka, "k") == [
        "k.partition_logs_by_traceid"
    ]
    assert _unknown_keys({"timeout": {"x": 1}}, kafka, "k") == [
        "k.timeout (a struct here, a scalar or list in the release)"
    ]
    assert _unknown_keys({"sending_queue": {"batch": {"min_size": 1}}}, kafka, "k") == []
    assert "partition_logs_by_trace_id" in kafka  # contrib v0.138+


def test_exporter_batches_in_its_sending_queue(doc: dict[str, Any]) -> None:
    assert "batch" not in (doc.get("processors") or {})
    queue = doc["exporters"]["kafka"]["sending_queue"]
    assert queue["batch"]["sizer"] == "items"
    assert queue["batch"]["max_size"] >= queue["batch"]["min_size"] > 0
