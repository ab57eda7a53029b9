"""Bankly's support agent and its simulated customers: the agent ``closeloop demo`` improves.

from examples.support_agent import init_agent_repo, run_cycle

init_agent_repo(path)                                   # the agent's git repository
report = run_cycle(path, "http://127.0.0.1:4318", n=300, seed=1)
print(report.table())                                   # outcomes per intent
"""

from __future__ import annotations

from .agent import DEFAULT_ENDPOINT, END_ATTRIBUTE, SupportAgent, TurnResult
from .behaviour import Behaviour, behaviour_from
from .intents import INTENTS, Intent
from .repo import init_agent_repo
from .run import ConversationResult, CycleReport, run_conversation, run_cycle
from .users import DATA_DIR, SimulatedUser, draw_user, load_utterances

__all__ = [
    "DATA_DIR",
    "DEFAULT_ENDPOINT",
    "END_ATTRIBUTE",
    "INTENTS",
    "Behaviour",
    "ConversationResult",
    "CycleReport",
    "Intent",
    "SimulatedUser",
    "SupportAgent",
    "TurnResult",
    "behaviour_from",
    "draw_user",
    "init_agent_repo",
    "load_utterances",
    "run_conversation",
    "run_cycle",
]
