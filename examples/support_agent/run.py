"""One cycle of Bankly support traffic: ``n`` simulated customers talk to the agent at ``main``.

    python -m examples.support_agent.run --repo /tmp/bankly-agent -n 300 --seed 1   # to 127.0.0.1:4318

Conversations arrive over a simulated window (about one every two seconds) starting at
``start_ns`` (by default so that the window ends about now); spans carry those simulated
times and are exported over OTLP/HTTP before :func:`run_cycle` returns.

The same ``seed`` draws the same customers (intents, openings, replies), whatever the
agent does, so two cycles with one seed compare agent versions on identical traffic.
Conversation, trace and span ids also depend on the agent version and ``start_ns``, so
cycles never reuse an id.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from opentelemetry.sdk.trace.export import SpanExporter

from .agent import DEFAULT_ENDPOINT, SupportAgent
from .repo import init_agent_repo
from .users import DATA_DIR, SimulatedUser, draw_user, load_utterances

OUTCOMES = ("resolved", "abandoned", "errored", "escalated")
MEAN_ARRIVAL_GAP_S = 2.0  # a busy support channel: ~1,800 conversations an hour
WINDOW_MARGIN_S = 300.0  # the last conversations need a few minutes to finish
FLUSH_EVERY = 50  # conversations between flushes: keeps the export queue short


@dataclass(frozen=True)
class ConversationResult:
    conversation_id: str
    intent: str
    outcome: str  # as the agent saw it: resolved | abandoned | errored | escalated
    turns: int
    start_ns: int
    end_ns: int


@dataclass
class CycleReport:
    """What one cycle did, as the agent saw it."""

    agent_version: str
    mode: str
    n: int
    seed: int
    start_ns: int
    end_ns: int = 0
    conversations: list[ConversationResult] = field(default_factory=list)

    def by_intent(self) -> dict[str, Counter[str]]:
        out: dict[str, Counter[str]] = {}
        for c in self.conversations:
            out.setdefault(c.intent, Counter())[c.outcome] += 1
        return dict(sorted(out.items()))

    def failure_rate(self, intent: str | None = None) -> float:
        """The share of conversations (of ``intent``) not resolved."""
        convs = [c for c in self.conversations if intent is None or c.intent == intent]
        return sum(c.outcome != "resolved" for c in convs) / len(convs) if convs else 0.0

    def table(self) -> str:
        rows = [f"{'intent':36} {'n':>4} " + " ".join(f"{o:>9}" for o in OUTCOMES) + "  failed"]
        for intent, counts in self.by_intent().items():
            n = sum(counts.values())
            rows.append(
                f"{intent:36} {n:>4} "
                + " ".join(f"{counts[o]:>9}" for o in OUTCOMES)
                + f"  {self.failure_rate(intent):6.0%}"
            )
        rows.append(
            f"{'all':36} {len(self.conversations):>4} "
            + " ".join(f"{sum(c.outcome == o for c in self.conversations):>9}" for o in OUTCOMES)
            + f"  {self.failure_rate():6.0%}"
        )
        return "\n".join(rows)


def run_conversation(
    agent: SupportAgent,
    user: SimulatedUser,
    conversation_id: str,
    start_ns: int,
    rng: random.Random,
) -> ConversationResult:
    """Play one conversation between ``user`` and ``agent`` from ``start_ns`` (simulated time)."""
    state = agent.start(conversation_id, user.intent if agent.mode == "scripted" else None, rng)
    message: str | None = user.opening
    t, turns, outcome = start_ns, 0, "abandoned"
    while message is not None and turns < agent.behaviour.max_turns:
        turns += 1
        result = agent.turn(state, message, t)
        t = result.end_ns
        if result.final:
            outcome = result.outcome
            break
        message = user.reply(result.text)
        if message is not None:
            t += int(user.think_ms(message) * 1e6)
    return ConversationResult(conversation_id, user.intent.name, outcome, turns, start_ns, t)


def run_cycle(
    repo_path: Path,
    endpoint: str = DEFAULT_ENDPOINT,
    n: int = 300,
    seed: int = 1,
    start_ns: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    *,
    exporter: SpanExporter | None = None,
    mode: Literal["auto", "scripted", "llm"] = "auto",
    data_dir: Path = DATA_DIR,
) -> CycleReport:
    """Run ``n`` conversations against the agent at the head of ``main`` and export their spans.

    ``exporter`` replaces the OTLP/HTTP exporter (tests pass an ``InMemorySpanExporter``);
    ``progress(done, n)`` is called after each conversation.
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    utterances = load_utterances(Path(data_dir))
    if start_ns is None:
        start_ns = time.time_ns() - int((n * MEAN_ARRIVAL_GAP_S + WINDOW_MARGIN_S) * 1e9)
    agent = SupportAgent(
        repo_path, endpoint, exporter=exporter, mode=mode, id_seed=f"{seed}:{start_ns}"
    )
    report = CycleReport(agent.version, agent.mode, n, seed, start_ns)
    arrivals = random.Random(f"{seed}:arrivals")
    ids = random.Random(f"{seed}:{start_ns}:{agent.version}:conversations")
    t = start_ns
    try:
        for i in range(n):
            t += int(arrivals.expovariate(1.0 / MEAN_ARRIVAL_GAP_S) * 1e9)
            user = draw_user(random.Random(f"{seed}:{i}:user"), utterances)
            conversation_id = str(uuid.UUID(int=ids.getrandbits(128), version=4))
            result = run_conversation(
                agent, user, conversation_id, t, random.Random(f"{seed}:{i}:agent")
            )
            report.conversations.append(result)
            report.end_ns = max(report.end_ns, result.end_ns)
            if (i + 1) % FLUSH_EVERY == 0:
                agent.provider.force_flush()
            if progress is not None:
                progress(i + 1, n)
    finally:
        agent.close()
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m examples.support_agent.run", description=__doc__.split("\n")[0]
    )
    p.add_argument(
        "--repo", type=Path, required=True, help="the agent's git repository (created if missing)"
    )
    p.add_argument(
        "--endpoint", default=DEFAULT_ENDPOINT, help="OTLP/HTTP endpoint (default %(default)s)"
    )
    p.add_argument("-n", type=int, default=300, help="conversations (default %(default)s)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--mode",
        choices=("auto", "scripted", "llm"),
        default="auto",
        help="auto: a real model when OPENAI_BASE_URL is set, else scripted",
    )
    args = p.parse_args(argv)
    init_agent_repo(args.repo)
    report = run_cycle(args.repo, args.endpoint, args.n, args.seed, mode=args.mode)
    print(
        f"agent version {report.agent_version} ({report.mode}), {report.n} conversations, "
        f"seed {report.seed}"
    )
    print(report.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
