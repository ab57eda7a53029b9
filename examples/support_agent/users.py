"""Simulated Bankly customers: real BANKING77 openings, short follow-ups, seeded.

A user is drawn from an rng: an intent (see ``intents.py``), an opening utterance
of that BANKING77 category, the details they carry (card last four digits, transfer
reference, woven into the opening) and their temperament — all drawn up front, so the
same seed gives the same users whatever the agent does. The user reads the agent's
messages as text, which works for the scripted agent and a real model alike.
"""

from __future__ import annotations

import csv
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .intents import INTENTS, Intent

REPO_ROOT = Path(__file__).resolve().parents[2]
DATA_DIR = REPO_ROOT / "examples" / "data" / "banking77"

LEAVE_EARLY = 0.03  # leave at the agent's first question, whatever it is
ASK_FOR_HUMAN = 0.02  # ask for a person at the second turn
ANSWER_REPEAT_ASK = 0.15  # answer when asked again for a detail already given (else leave)
MENTION_CARD = 0.7  # put the card's last four digits in the opening message
CANONICAL_REFERENCE = 0.3  # write the transfer reference as the app shows it (TR-55912)

CARD_DETAIL = (
    "My card number ends in {d}.",
    "The last four digits of my card are {d}.",
    "It's the card with last four digits {d}.",
    "(card number ending {d})",
)
TRANSFER_DETAIL = (
    "The reference is {ref}.",
    "It was transfer {ref}.",
    "Transfer reference: {ref}.",
    "(ref {ref})",
)
DIGITS_REPLY = ("{d}", "It's {d}.", "{d}, like I said", "{d}. I already told you that")
REFERENCE_REPLY = ("{ref}", "it's {ref}")
HUMAN_REPLY = (
    "Can I talk to a real person please?",
    "I'd rather speak to someone real.",
    "Can you put me through to a human?",
)
ASKS_DIGITS = re.compile(r"last (?:4|four) digits|card number", re.IGNORECASE)
ASKS_REFERENCE = re.compile(r"\breference\b", re.IGNORECASE)


@lru_cache(maxsize=4)
def load_utterances(data_dir: Path = DATA_DIR) -> dict[str, tuple[str, ...]]:
    """The BANKING77 training utterances of the simulated intents, per category, in file order."""
    path = Path(data_dir) / "train.csv"
    if not path.exists():
        raise FileNotFoundError(
            f"BANKING77 not found at {path} (expected train.csv with text,category)"
        )
    out: dict[str, list[str]] = {name: [] for name in INTENTS}
    with path.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            text = " ".join(row["text"].split())
            if row["category"] in out and 15 <= len(text) <= 220:
                out[row["category"]].append(text)
    missing = [k for k, v in out.items() if not v]
    if missing:
        raise ValueError(f"{path}: no utterances for {missing}")
    return {k: tuple(v) for k, v in out.items()}


def with_detail(opening: str, detail: str) -> str:
    """Append a sentence (or a parenthesis) to an utterance, punctuating as a person would."""
    opening = opening.rstrip()
    if detail.startswith("("):
        return f"{opening.rstrip('.')} {detail}"
    if opening[-1] not in ".?!":
        opening += "."
    return f"{opening} {detail}"


@dataclass
class SimulatedUser:
    """One customer with one goal. :meth:`reply` returns ``None`` when they leave."""

    intent: Intent
    opening: str
    rng: random.Random
    card_last4: str = ""
    gave_card_last4: bool = False  # the opening holds the digits
    transfer_ref: str = ""
    leaves_early: bool = False
    asks_for_human: bool = False
    answers_repeat_ask: bool = False
    turn: int = 1
    answered: int = 0

    def reply(self, agent_text: str) -> str | None:
        """The next message after the agent said ``agent_text`` (which did not end the chat)."""
        self.turn += 1
        if self.leaves_early:
            return None
        if self.asks_for_human and self.turn == 2:
            return self.rng.choice(HUMAN_REPLY)
        if self.card_last4 and ASKS_DIGITS.search(agent_text):
            # Asked again for digits they gave in their first message, most leave.
            if self.gave_card_last4 and not self.answers_repeat_ask:
                return None
            replies = DIGITS_REPLY if self.gave_card_last4 else DIGITS_REPLY[:2]
            return self.rng.choice(replies).format(d=self.card_last4)
        if self.transfer_ref and ASKS_REFERENCE.search(agent_text):
            return self.rng.choice(REFERENCE_REPLY).format(ref=self.transfer_ref)
        options = (
            self.intent.replies[min(self.answered, len(self.intent.replies) - 1)]
            if self.intent.replies
            else ("yes",)
        )
        self.answered += 1
        return self.rng.choice(options)

    def think_ms(self, message: str) -> float:
        """Reading the agent's answer and typing ``message``, in milliseconds."""
        return 2500.0 + 180.0 * len(message) + self.rng.uniform(0.0, 9000.0)


def draw_user(rng: random.Random, utterances: dict[str, tuple[str, ...]]) -> SimulatedUser:
    """A customer: intent (uniform over :data:`INTENTS`), opening and temperament drawn from ``rng``."""
    intent = INTENTS[rng.choice(sorted(INTENTS))]
    opening = rng.choice(utterances[intent.name])
    temperament = rng.random()
    user = SimulatedUser(
        intent=intent,
        opening=opening,
        rng=rng,
        leaves_early=temperament < LEAVE_EARLY,
        asks_for_human=LEAVE_EARLY <= temperament < LEAVE_EARLY + ASK_FOR_HUMAN,
        answers_repeat_ask=rng.random() < ANSWER_REPEAT_ASK,
    )
    if intent.kind == "card":
        user.card_last4 = f"{rng.randint(1000, 9999)}"
        detail = rng.choice(CARD_DETAIL).format(d=user.card_last4)
        user.gave_card_last4 = rng.random() < MENTION_CARD
        if user.gave_card_last4:
            user.opening = with_detail(opening, detail)
    elif intent.kind == "transfer":
        number = rng.randint(10000, 99999)
        user.transfer_ref = f"TR-{number}" if rng.random() < CANONICAL_REFERENCE else f"tr {number}"
        user.opening = with_detail(
            opening, rng.choice(TRANSFER_DETAIL).format(ref=user.transfer_ref)
        )
    return user
