"""A reference set per conversation: its nearest successful conversations by goal, and the
ways it departs from what they do. Contrasts made within similar goals, not across a whole
intent (an intent such as "change my booking" mixes requests whose right actions differ).

The goal of a conversation is what the user said in its first ``GOAL_TURNS`` messages;
similarity is the cosine of their TF-IDF vectors over the intent's conversations (words a
few conversations share weigh more than words all of them use). The reference set of a
conversation is its ``k`` most similar successful conversations (itself excluded), each at
least ``min_similarity`` alike. Against it, a conversation shows these patterns
(a *departure* is what it does and most of its reference set does not, or the reverse):

===================  ==========================================================  ===================
pattern              the conversation ...                                        failure_kind
===================  ==========================================================  ===================
``misses:T``         never calls state-changing or hand-off ``T``; most of its     missing_action
                     references do
``extra:T``          calls state-changing ``T``; none of its references does      unauthorized_action
``differs:T.k``      calls ``T`` with none of the values of ``k`` most of its      wrong_tool_arguments
                     references give (``differs:T``: for some ``k``)
``extra_handoff:T``  hands the user to a human with ``T``; none of its references  unnecessary_escalation
                     does
===================  ==========================================================  ===================

plus ``misses``, ``extra`` and ``differs`` for any tool (and, added by
:func:`processors.diagnose.contrast.add_departures`, ``departs``: any departure). Successful conversations get the same
patterns against their own reference sets, so :func:`processors.diagnose.contrast.contrast`
can test whether failures depart from their references more often than successes do.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Iterable

from processors.records import Conversation

GOAL_TURNS = 2  # the user's first messages: what the conversation is for
_WORD = re.compile(r"(?<![\w-])[a-z][a-z']+(?![\w-])", re.IGNORECASE)  # words, not ids or numbers

Vector = dict[str, float]


def goal_text(conv: Conversation) -> str:
    said = [m.content for m in conv.messages if m.role == "user" and m.content]
    return "\n".join(said[:GOAL_TURNS])


def tfidf(texts: dict[str, str]) -> dict[str, Vector]:
    """Unit-length TF-IDF vectors of ``texts`` (id -> text), the idf over ``texts`` themselves."""
    words = {cid: Counter(w.lower() for w in _WORD.findall(t)) for cid, t in texts.items()}
    df: Counter[str] = Counter(w for c in words.values() for w in c)
    n = len(texts)
    out = {}
    for cid, counts in words.items():
        v = {
            w: (1 + math.log(c)) * (1 + math.log((1 + n) / (1 + df[w]))) for w, c in counts.items()
        }
        norm = math.sqrt(sum(x * x for x in v.values())) or 1.0
        out[cid] = {w: x / norm for w, x in v.items() if x}
    return out


def cosine(a: Vector, b: Vector) -> float:
    if len(a) > len(b):
        a, b = b, a
    return sum(x * b.get(w, 0.0) for w, x in a.items())


def references(
    vectors: dict[str, Vector], ok: Iterable[str], k: int, min_similarity: float
) -> dict[str, list[str]]:
    """For every conversation of ``vectors``: its ``k`` nearest successful ones (from ``ok``,
    never itself), most similar first, each at least ``min_similarity`` alike."""
    ok = [c for c in ok if c in vectors]
    out = {}
    for cid, v in vectors.items():
        sims = sorted(
            ((cosine(v, vectors[o]), o) for o in ok if o != cid), key=lambda x: (-x[0], x[1])
        )
        out[cid] = [o for s, o in sims[:k] if s >= min_similarity]
    return out


def departures(
    writes: dict[str, dict[str, dict[str, set[str]]]],
    is_handoff: Callable[[str], bool],
    refs: dict[str, list[str]],
) -> dict[str, set[str]]:
    """The departure patterns of every conversation of ``refs`` (see the module's docstring).

    ``writes``: conversation -> state-changing or hand-off tool it calls -> argument -> the
    values it gave; ``is_handoff`` tells the hand-off tools."""
    return {
        cid: _departures(writes.get(cid, {}), [writes.get(r, {}) for r in ref], is_handoff)
        for cid, ref in refs.items()
        if ref
    }


def _departures(
    mine: dict[str, dict[str, set[str]]],
    refs: list[dict[str, dict[str, set[str]]]],
    is_handoff: Callable[[str], bool],
) -> set[str]:
    def most(n: int) -> bool:
        return 2 * n > len(refs)

    used = Counter(t for r in refs for t in r)
    pats = set()
    for tool, n in used.items():
        if most(n) and tool not in mine:
            pats |= {f"misses:{tool}", "misses"}
    for tool, args in mine.items():
        if not used[tool]:
            pats |= {f"extra_handoff:{tool}"} if is_handoff(tool) else {f"extra:{tool}", "extra"}
            continue
        for key, values in args.items():
            given = Counter(v for r in refs for v in r.get(tool, {}).get(key, ()))
            agreed = {v for v, n in given.items() if most(n)}
            if agreed and not agreed & values:
                pats |= {f"differs:{tool}.{key}", f"differs:{tool}", "differs"}
    return pats
