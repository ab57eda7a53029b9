"""LLM work beside the stream: every LLM step runs as work items of its own, bounded.

A stage writes its deterministic result first and hands the LLM's part (naming intents,
judging a conversation, rewording a diagnosis, wording a proposal) to its :class:`LLMStep`;
the stage acknowledges its input without waiting. The step's answer arrives later and the
stage writes it as a new version of the row it improves. So the speed of a remote model
never decides whether the stream keeps its offsets.

Each step is bounded (:class:`~processors.config.LLMStepConfig`): ``concurrency`` calls at
once on threads of its own, ``calls_per_min`` (calls are spaced), ``tokens_per_hour`` (over
budget, calls are skipped), ``llm.queue_max`` waiting items (beyond, the item is skipped: the
deterministic result stands). A :class:`Breaker` pauses a step after ``llm.breaker_failures``
failures in a row. :class:`AnswerCache` keeps answers by content hash, persisted in the store
(``llm_answers``), so a redelivered batch or a restart does not ask again.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from processors.config import LLM_STEPS, LLMConfig, LLMStepConfig
from processors.errors import LLMError
from processors.llm import LLM, ChatJSON, make_llm
from processors.redact import Redactor, redact_value

R = TypeVar("R")

CACHE_CAP = 20_000  # answers kept in memory (and loaded from the store at start)
LATENCY_WINDOW = 256  # recent call latencies kept for the median


class Breaker:
    """Open (calls skipped) for ``pause_s`` after ``failures`` failures in a row; after the
    pause one call tries again (half-open): a success closes it, a failure opens it again.

    >>> b = Breaker(2, 10.0)
    >>> b.record(False, 0.0); b.record(False, 1.0); b.state(2.0), b.allow(2.0)
    ('open', False)
    >>> b.state(12.0), b.allow(12.0)
    ('half-open', True)
    >>> b.record(True, 12.5); b.state(13.0)
    'closed'
    """

    def __init__(self, failures: int, pause_s: float) -> None:
        self.failures = failures
        self.pause_s = pause_s
        self.streak = 0
        self.open_until = 0.0
        self.trips = 0

    def allow(self, now: float) -> bool:
        return now >= self.open_until

    def record(self, ok: bool, now: float) -> None:
        if ok:
            self.streak = 0
            return
        self.streak += 1
        if self.streak >= self.failures:
            self.open_until = now + self.pause_s
            self.trips += 1

    def state(self, now: float) -> str:
        if now < self.open_until:
            return "open"
        return "half-open" if self.streak >= self.failures else "closed"


class Limits:
    """Calls per minute (spaced evenly) and tokens per hour (a sliding hour), 0: unbounded."""

    def __init__(self, cfg: LLMStepConfig) -> None:
        self.interval_s = 60.0 / cfg.calls_per_min if cfg.calls_per_min else 0.0
        self.tokens_per_hour = cfg.tokens_per_hour
        self._next = 0.0
        self._spent: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def reserve(self, now: float) -> float:
        """Seconds to wait before the next call may start (its slot is taken)."""
        with self._lock:
            start = max(now, self._next)
            self._next = start + self.interval_s
            return start - now

    def spent(self, now: float) -> int:
        with self._lock:
            while self._spent and self._spent[0][0] < now - 3600:
                self._spent.popleft()
            return sum(n for _, n in self._spent)

    def over_budget(self, now: float) -> bool:
        return bool(self.tokens_per_hour) and self.spent(now) >= self.tokens_per_hour

    def took(self, now: float, tokens: int) -> None:
        with self._lock:
            self._spent.append((now, tokens))


class AnswerCache:
    """Valid-JSON answers by a hash of everything the model was sent, redacted (a model may
    repeat what it read, and the answers are stored). New answers wait in :meth:`drain` to be
    written to ``llm_answers``; :meth:`load` puts stored ones back."""

    def __init__(self, redactor: Redactor, cap: int = CACHE_CAP) -> None:
        self.redactor = redactor
        self.cap = cap
        self._answers: OrderedDict[str, str] = OrderedDict()
        self._new: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    @staticmethod
    def key(model: str, *parts: object) -> str:
        h = hashlib.sha256(model.encode())
        for p in parts:
            h.update(b"\x1f" + json.dumps(p, ensure_ascii=False, sort_keys=True).encode())
        return h.hexdigest()[:32]

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            raw = self._answers.get(key)
            if raw is None:
                return None
            self._answers.move_to_end(key)
        value: dict[str, Any] = json.loads(raw)
        return value

    def put(self, step: str, key: str, value: dict[str, Any], now_ns: int) -> None:
        raw = json.dumps(redact_value(value, self.redactor), ensure_ascii=False, sort_keys=True)
        with self._lock:
            self._remember(key, raw)
            self._new.append(dict(key=key, step=step, answer=raw, ts_ns=now_ns))

    def _remember(self, key: str, raw: str) -> None:
        self._answers[key] = raw
        self._answers.move_to_end(key)
        while len(self._answers) > self.cap:
            self._answers.popitem(last=False)

    def load(self, rows: list[dict[str, Any]]) -> None:
        """Stored answers (``key``, ``answer``), oldest first."""
        with self._lock:
            for r in rows:
                self._remember(str(r["key"]), str(r["answer"]))

    def drain(self) -> list[dict[str, Any]]:
        """The answers not written yet (the caller writes them to ``llm_answers``)."""
        with self._lock:
            out, self._new = self._new, []
        return out

    def __len__(self) -> int:
        return len(self._answers)


@dataclass
class StepStats:
    calls: int = 0  # requests sent to the endpoint
    failures: int = 0  # of those, failed or unusable
    cached: int = 0  # answered from the cache
    skipped: int = 0  # items not asked (breaker open, queue full, budget spent)
    tokens: int = 0
    queued: int = 0  # items waiting or running now
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))

    def median_latency_s(self) -> float:
        return statistics.median(self.latencies) if self.latencies else 0.0


class MeteredChat:
    """The :class:`~processors.llm.ChatJSON` a step's jobs use: cache first, then the breaker,
    the budget and the rate, then the endpoint; every outcome counted in ``stats``."""

    def __init__(self, step: LLMStep) -> None:
        self.step = step

    def chat_json(
        self, system: str, user: str, schema_hint: str, *, required: tuple[str, ...] = ()
    ) -> dict[str, Any]:
        s = self.step
        key = AnswerCache.key(s.llm.model, system, user, schema_hint, list(required))
        hit = s.cache.get(key)
        if hit is not None:
            s.stats.cached += 1
            return hit
        now = time.monotonic()
        if not s.breaker.allow(now):
            s.stats.skipped += 1
            raise LLMError(f"llm step {s.name} paused after {s.breaker.streak} failures in a row")
        if s.limits.over_budget(now):
            s.stats.skipped += 1
            raise LLMError(f"llm step {s.name}: token budget of the hour spent")
        time.sleep(s.limits.reserve(now))
        start = time.monotonic()
        s.stats.calls += 1
        try:
            value, tokens = s.llm.complete(system, user, schema_hint, required=required)
        except LLMError:
            s.stats.failures += 1
            s.breaker.record(False, time.monotonic())
            raise
        end = time.monotonic()
        s.breaker.record(True, end)
        s.stats.latencies.append(end - start)
        s.stats.tokens += tokens
        s.limits.took(end, tokens)
        s.cache.put(s.name, key, value, time.time_ns())
        return value


class LLMStep:
    """One LLM step's bounded work: :meth:`submit` a job, get a future (or ``None`` when the
    item is skipped and the deterministic result stands)."""

    def __init__(self, name: str, cfg: LLMConfig, llm: LLM, cache: AnswerCache) -> None:
        bounds = cfg.step(name)
        self.name = name
        self.llm = llm
        self.cache = cache
        self.queue_max = cfg.queue_max
        self.breaker = Breaker(cfg.breaker_failures, cfg.breaker_pause_s)
        self.limits = Limits(bounds)
        self.stats = StepStats()
        self.chat = MeteredChat(self)
        self._pool = ThreadPoolExecutor(bounds.concurrency, f"llm-{name}")
        self._lock = threading.Lock()

    def submit(self, job: Callable[[ChatJSON], R]) -> Future[R] | None:
        """Run ``job(chat)`` on the step's threads; ``None`` when the queue is full or the
        breaker is open (the caller keeps its deterministic result)."""
        with self._lock:
            if self.stats.queued >= self.queue_max or not self.breaker.allow(time.monotonic()):
                self.stats.skipped += 1
                return None
            self.stats.queued += 1
        fut = self._pool.submit(job, self.chat)
        fut.add_done_callback(self._done)
        return fut

    def _done(self, _: Future[Any]) -> None:
        with self._lock:
            self.stats.queued -= 1

    def row(self, worker: str, now_ns: int) -> dict[str, Any]:
        """The step's ``llm_stats`` row (cumulative counters of this worker process)."""
        st = self.stats
        return dict(
            ts_ns=now_ns,
            worker=worker,
            step=self.name,
            calls=st.calls,
            failures=st.failures,
            cached=st.cached,
            skipped=st.skipped,
            tokens=st.tokens,
            median_latency_s=round(st.median_latency_s(), 3),
            queued=st.queued,
            breaker=self.breaker.state(time.monotonic()),
        )

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class LLMWork:
    """The worker's LLM steps (none without a configured endpoint) and their answer cache."""

    def __init__(self, cfg: LLMConfig, redactor: Redactor, llm: LLM | None = None) -> None:
        self.llm = llm if llm is not None else make_llm(cfg)
        self.cfg = cfg
        self.cache = AnswerCache(redactor)
        self.steps: dict[str, LLMStep] = (
            {n: LLMStep(n, cfg, self.llm, self.cache) for n in LLM_STEPS} if self.llm else {}
        )

    def step(self, name: str) -> LLMStep | None:
        return self.steps.get(name)

    def rows(self, worker: str, now_ns: int) -> list[dict[str, Any]]:
        return [s.row(worker, now_ns) for s in self.steps.values()]

    def close(self) -> None:
        for s in self.steps.values():
            s.close()


LLM_STATS_COLUMNS = (
    "ts_ns",
    "worker",
    "step",
    "calls",
    "failures",
    "cached",
    "skipped",
    "tokens",
    "median_latency_s",
    "queued",
    "breaker",
)
