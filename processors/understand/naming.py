"""Intent names: a phrase from the intent's central examples, or an LLM given examples.

* :class:`KeyphraseIndex` keeps per-intent document counts of terms online (uni- and bigrams,
  stop-words removed, bounded), so naming needs no stored corpus.
* :func:`keyphrases` scores a class's terms against the corpus, c-TF-IDF as in BERTopic:
  ``tf(t, c) * log(1 + A / f(t))`` with ``A`` the average number of terms per class and
  ``f(t)`` the term's frequency over all classes.
* :func:`name_intent` names an intent deterministically: the
  shortest stretch of a central example that holds its most distinctive words, as the users
  put it (:func:`phrase_name`: "card has not arrived", "cancel a transfer"), else the top
  keyphrases. A word is used only if many of the intent's conversations hold it
  (:data:`NAME_MIN_DOC_SHARE`), never a number or a word with digits: a customer's name, an
  id or a code that one conversation carries never becomes a name.
* :func:`llm_names` names several intents in one LLM call, a product-specific name and
  one-sentence description each from representative examples (quoted as untrusted data).
* :class:`Namer` decides when a name is due again (the intent doubled, merged or split) and
  when to ask the LLM (bounded per intent), and flags renames so that the caller versions them.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from processors.errors import LLMError
from processors.llm import UNTRUSTED_RULE, ChatJSON, untrusted_block

# Redaction placeholders (capture's "[REDACTED:email]", or "[EMAIL]", "<CARD_NUMBER>") are not words.
_PLACEHOLDER = re.compile(r"\[[A-Z][A-Za-z0-9_:]*\]|<[A-Z][A-Z0-9_]*>")
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
# Parts joined by a dash, underscore or slash, one with a digit: an id or code ("QX-4821",
# "acc_77", "AB12-C"); none of its parts is a word a name may hold ("qx" alone says nothing).
_CODE = re.compile(r"\b[A-Za-z0-9]+(?:[-_/][A-Za-z0-9]+)+\b")
# One or two letters, a space, three digits or more: a code written as users type it
# ("qx 4821", "XY 901").
_SPACED_CODE = re.compile(r"\b[A-Za-z]{1,2}\s+\d{3,}\b")
_CLAUSE_BREAK = re.compile(r"[.,;:!?()\[\]{}\"\n]+")

_STOP_TEXT = """
a about above after again against all am an and any are aren't as at be because been before being below
between both but by can can't cannot could couldn't did didn't do does doesn't doing don't down during each
few for from further had hadn't has hasn't have haven't having he her here hers herself him himself his how
i i'd i'll i'm i've if in into is isn't it it's its itself just let's me more most my myself no nor not of
off on once only or other ought our ours ourselves out over own same she should shouldn't so some such than
that that's the their theirs them themselves then there there's these they they'd they'll they're they've
this those through to too under until up very was wasn't we we'd we'll we're we've were weren't what what's
when when's where where's which while who who's whom why why's will with won't would wouldn't you you'd
you'll you're you've your yours yourself yourselves
also already anyone anything get got getting go going hello hey hi help know like make may maybe much
need needs one ok okay please possible really see still sure tell thank thanks thing things want wanted
way well yes yet im ive dont cant
"""
STOP_WORDS = frozenset(_STOP_TEXT.split())

NAME_MAX_WORDS = 3  # a keyphrase name: the top phrases up to this many words
PHRASE_MAX_WORDS = 5  # a phrase name: at most this many words, stop-words included
PHRASE_WORD_COST = 0.15  # a phrase's score: its keywords' weights (best 1) less this per word
NAME_MIN_DOCS = 3  # a name's words appear in at least this many of the intent's conversations
NAME_MIN_DOC_SHARE = 0.1  # ... and in at least this share of them
NAME_MAX_CHARS = 60
DESCRIPTION_MAX_CHARS = 240
LLM_MAX_EXAMPLES = 12
LLM_MAX_EXAMPLE_CHARS = 300


def _unnamable(text: str) -> str:
    """``text`` with redaction placeholders and ids or codes replaced by a clause break."""
    text = _SPACED_CODE.sub(",", _PLACEHOLDER.sub(",", text))
    return _CODE.sub(lambda m: "," if any(ch.isdigit() for ch in m[0]) else m[0], text)


def words(text: str) -> list[str]:
    """Lower-case word tokens, redaction placeholders removed (stop-words kept)."""
    return _WORD.findall(_PLACEHOLDER.sub(" ", text).lower().replace("\u2019", "'"))


# Particles of phrasal verbs: a stop-word alone, but "top up", "log in", "sign out" name things.
_PARTICLES = frozenset({"up", "in", "out", "off"})


def terms(text: str) -> list[str]:
    """Uni- and bigrams without stop-words; a bigram joins two adjacent non-stop words only
    (or a word and its particle), so "waiting on my card" yields no "waiting card".

    >>> terms("Can't log in after the top up")
    ['log', 'top', 'log in', 'top up']
    >>> terms("transfer QX-4821 to my e-mail, or qx 4821")
    ['transfer', 'mail']
    """
    uni: list[str] = []
    bi: list[str] = []
    # bigrams stay within a clause: "my card, sent today" has no "card sent"
    for clause in _CLAUSE_BREAK.split(_unnamable(text)):
        ws = words(clause)
        keep = [w not in STOP_WORDS and len(w) > 1 and not w.isdigit() for w in ws]
        uni += [w for w, k in zip(ws, keep) if k]
        bi += [
            f"{a} {b}"
            for a, b, ka, kb in zip(ws, ws[1:], keep, keep[1:])
            if ka and (kb or b in _PARTICLES)
        ]
    return uni + bi


@dataclass
class CorpusStats:
    """Term frequencies over all intents, the denominator of c-TF-IDF."""

    term_counts: Mapping[str, int]
    total: int
    n_classes: int


@dataclass
class IntentName:
    name: str
    description: str
    keywords: list[str] = field(default_factory=list)
    source: str = "keyphrases"  # keyphrases | llm


def keyphrases(
    class_counts: Mapping[str, int], stats: CorpusStats, k: int = 10
) -> list[tuple[str, float]]:
    """The ``k`` most distinctive terms of one class, best first (ties broken by the term)."""
    n_class = sum(class_counts.values())
    if n_class == 0:
        return []
    avg = max(stats.total, n_class) / max(stats.n_classes, 1)
    scored = [
        (t, (c / n_class) * math.log(1 + avg / max(stats.term_counts.get(t, 0), c)))
        for t, c in class_counts.items()
    ]
    scored.sort(key=lambda ts: (-ts[1], ts[0]))
    return scored[:k]


_SUFFIXES = ("ations", "ation", "ings", "ing", "ions", "ion", "ed", "es", "s", "al")


def _stem(word: str) -> str:
    """A crude stem, only to keep inflections out of one name ("activate activating")."""
    for suf in _SUFFIXES:
        if word.endswith(suf) and len(word) - len(suf) >= 3:
            word = word[: -len(suf)]
            break
    return word.rstrip("e")


def keyphrase_name(ranked: list[tuple[str, float]]) -> str:
    """A short readable name from ranked keyphrases, best first.

    A phrase adding no new word stem is skipped; a bigram that contains a chosen
    unigram replaces it ("rates" then "exchange rates" gives "exchange rates");
    other partial overlaps are skipped, as they read badly.

    >>> keyphrase_name([("rates", 1.0), ("exchange rates", .9), ("rate", .8), ("foreign exchange", .7)])
    'exchange rates'
    """
    chosen: list[list[str]] = []
    for phrase, _ in ranked:
        ws = phrase.split()
        stems = {_stem(w) for w in ws}
        have = {_stem(w) for p in chosen for w in p}
        if stems <= have:
            continue
        overlap = [k for k, p in enumerate(chosen) if stems & {_stem(w) for w in p}]
        n_words = sum(map(len, chosen))
        if not overlap and n_words + len(ws) <= NAME_MAX_WORDS:
            chosen.append(ws)
        elif (
            len(overlap) == 1
            and len(chosen[overlap[0]]) == 1
            and n_words - 1 + len(ws) <= NAME_MAX_WORDS
        ):
            chosen[overlap[0]] = ws
        if sum(map(len, chosen)) >= NAME_MAX_WORDS:
            break
    return " ".join(w for p in chosen for w in p)


NAMING_SYSTEM = f"""You name intents: kinds of request that users bring to a software product's AI agent.
For each intent you get example user messages and its distinctive keyphrases.
- name: 2 to 6 lower-case words, specific to this product: the concrete object and problem, like
  "re-auth loop in cli login" or "card arrival delay", never a generic category like "account issue".
- description: one sentence saying what these users want or run into.
- keywords: 3 to 8 short phrases users use for it.
Answer for every intent, by its number.
{UNTRUSTED_RULE}"""
NAMING_SCHEMA = (
    '{"intents": [{"intent": 1, "name": "card arrival delay", "description": "...", '
    '"keywords": ["card", "..."]}]}'
)


@dataclass(frozen=True)
class NameRequest:
    """An intent to name with the LLM: its examples (redacted user messages) and keyphrases."""

    intent_id: str
    examples: tuple[str, ...]
    keyphrases: tuple[str, ...]


def _one_line(value: Any, max_chars: int) -> str:
    if not isinstance(value, str):
        raise LLMError(f"expected a string, got {type(value).__name__}")
    text = value.strip().rstrip(".")
    if not text or len(text) > max_chars or any(ch in text for ch in "\r\n\t"):
        raise LLMError(f"{text[:80]!r} is empty, longer than {max_chars} chars or not one line")
    return text


def naming_prompt(requests: list[NameRequest]) -> str:
    """Every intent's keyphrases and examples, each quoted as untrusted data, by number."""
    parts = ["Name each of these intents."]
    for k, r in enumerate(requests, 1):
        parts.append(f"Intent {k}:")
        parts.append(untrusted_block(f"keyphrases {k}", [{"phrase": p} for p in r.keyphrases[:8]]))
        parts.append(
            untrusted_block(
                f"examples {k}",
                [{"text": e[:LLM_MAX_EXAMPLE_CHARS]} for e in r.examples[:LLM_MAX_EXAMPLES]],
            )
        )
    return "\n".join(parts)


def parse_name(entry: Any, keyphrases: tuple[str, ...]) -> IntentName:
    """One intent's name from the model's answer; :class:`LLMError` when unusable."""
    if not isinstance(entry, dict):
        raise LLMError(f"an intent's answer is {type(entry).__name__}, expected an object")
    name = _one_line(entry.get("name"), NAME_MAX_CHARS)
    if len(name.split()) > 8:
        raise LLMError(f"name {name!r} has more than 8 words")
    description = _one_line(entry.get("description"), DESCRIPTION_MAX_CHARS)
    kw = entry.get("keywords")
    try:
        keywords = [_one_line(k, 40) for k in kw][:8] if isinstance(kw, list) and kw else []
    except LLMError:
        keywords = []
    return IntentName(name, description, keywords or list(keyphrases[:8]), source="llm")


def llm_names(
    requests: list[NameRequest], llm: ChatJSON
) -> tuple[dict[str, IntentName], list[str]]:
    """Name several intents in one call: ``({intent_id: name}, [why an intent got none])``.

    Raises :class:`LLMError` when the call fails or answers no usable name at all.
    """
    out = llm.chat_json(
        NAMING_SYSTEM, naming_prompt(requests), NAMING_SCHEMA, required=("intents",)
    )
    entries = out["intents"]
    if not isinstance(entries, list):
        raise LLMError(f"'intents' is {type(entries).__name__}, expected a list")
    by_number = {
        e.get("intent"): e
        for e in entries
        if isinstance(e, dict) and isinstance(e.get("intent"), int)
    }
    names: dict[str, IntentName] = {}
    problems: list[str] = []
    for k, r in enumerate(requests, 1):
        try:
            names[r.intent_id] = parse_name(by_number.get(k), r.keyphrases)
        except LLMError as e:
            problems.append(f"intent {r.intent_id}: {e}")
    if not names:
        raise LLMError(f"no usable name in the answer: {'; '.join(problems)[:300]}")
    return names, problems


def allowed_words(class_counts: Mapping[str, int], n_docs: int) -> set[str]:
    """Words that enough of the intent's ``n_docs`` conversations hold to go into its name:
    a name, id, code or number one customer gave never does."""
    floor = max(NAME_MIN_DOCS, NAME_MIN_DOC_SHARE * n_docs)
    return {
        t
        for t, c in class_counts.items()
        if c >= floor and " " not in t and t.isalpha() and t not in STOP_WORDS
    }


def phrase_name(
    examples: list[str],
    ranked: list[tuple[str, float]],
    allowed: set[str],
    taken: frozenset[str] = frozenset(),
) -> str:
    """The shortest stretch of one example (a clause, up to :data:`PHRASE_MAX_WORDS` words) that
    holds the most keyphrase weight, made of allowed words and the stop-words between them, and
    is not the name of another intent (``taken``); examples come most central first, which wins
    ties.

    >>> ranked = [("arrived", 1.0), ("card", 0.8), ("yet", 0.1)]
    >>> phrase_name(["Why has my card not arrived yet?"], ranked, {"card", "arrived"})
    'card not arrived'
    """
    top = max((sc for t, sc in ranked if t in allowed), default=1.0)
    weight = {t: sc / top for t, sc in ranked if t in allowed}  # the best word weighs 1
    best: tuple[float, int, int, str] = (-1.0, 0, 0, "")  # (score, -length, -rank, phrase)
    for rank, example in enumerate(examples):
        for clause in _CLAUSE_BREAK.split(_unnamable(example)):
            ws = words(clause)
            for i, first in enumerate(ws):
                if first not in weight:
                    continue
                for j in range(i, min(i + PHRASE_MAX_WORDS, len(ws))):
                    w = ws[j]
                    if w not in weight and (w not in STOP_WORDS or not w.isalpha()):
                        break  # a word the name may not hold: no longer stretch either
                    if w not in weight and w not in _PARTICLES:
                        continue  # a stretch ends on a distinctive word or a particle
                    span = ws[i : j + 2 if ws[j + 1 : j + 2] == ["up"] else j + 1]
                    # each word costs a little: a keyword only joins the name if it says more
                    score = sum(weight.get(t, 0.0) for t in set(span)) - PHRASE_WORD_COST * len(
                        span
                    )
                    key = (round(score, 9), -len(span), -rank, " ".join(span))
                    if key[:3] > best[:3] and key[3] not in taken:
                        best = key
    return best[3]


def name_intent(
    examples: list[str],
    all_docs_stats: CorpusStats,
    *,
    class_counts: Mapping[str, int] | None = None,
    n_docs: int | None = None,
    taken: frozenset[str] = frozenset(),
) -> IntentName:
    """The deterministic name of an intent from its ``examples`` (redacted user messages, most
    central first); a phrase another intent is named (``taken``) is passed over while another
    phrase of its examples will do: two intents of one name read as one.

    ``class_counts`` (e.g. :meth:`KeyphraseIndex.counts`) are the intent's accumulated document
    counts of terms over ``n_docs`` conversations; without them they are counted from
    ``examples``.
    """
    if class_counts is None:
        class_counts = Counter(t for e in examples for t in dict.fromkeys(terms(e)))
        n_docs = len(examples)
    allowed = allowed_words(class_counts, n_docs if n_docs is not None else len(examples))
    ranked = keyphrases(class_counts, all_docs_stats, k=30)
    # bigrams too, when both their words are allowed: they weigh phrases that keep them together
    ranked = [(t, sc) for t, sc in ranked if all(w in allowed for w in t.split())]
    unigrams = [(t, sc) for t, sc in ranked if " " not in t]
    name = (
        phrase_name(examples, unigrams, allowed, taken)
        or keyphrase_name(ranked)
        or "unnamed intent"
    )
    if len(name.split()) == 1 and len(unigrams) > 1:
        name = keyphrase_name(ranked) or name  # one word says little: the top keyphrases say more
    top = [p for p, _ in ranked[:5]]
    desc = (
        f"Users asking about {', '.join(top[:3])}."
        if top
        else "Users with no distinctive wording yet."
    )
    return IntentName(name, desc, [p for p, _ in ranked[:8]])


class KeyphraseIndex:
    """Per-intent document counts of terms, maintained online, bounded to ``max_terms`` terms per intent.

    When an intent exceeds its bound its rarest terms are dropped (ties by term, so the
    result is deterministic); the corpus counts stay the sum of what is kept.

    >>> ix = KeyphraseIndex()
    >>> for t in ["my card has not arrived", "card still not arrived", "when does my card arrive"]:
    ...     ix.add("a", t)
    >>> for t in ["exchange rate for euros", "what rate do you use to exchange"]:
    ...     ix.add("b", t)
    >>> [p for p, _ in ix.keyphrases("a", 2)]
    ['card', 'arrived']
    """

    def __init__(self, max_terms: int = 2000) -> None:
        if max_terms < 10:
            raise ValueError(f"max_terms must be >= 10, got {max_terms}")
        self.max_terms = max_terms
        self._counts: dict[str, Counter[str]] = {}
        self._docs: Counter[str] = Counter()
        self._corpus: Counter[str] = Counter()

    def add(self, intent_id: str, text: str) -> None:
        c = self._counts.setdefault(intent_id, Counter())
        ts = list(dict.fromkeys(terms(text)))  # document counts: a word said twice counts once
        c.update(ts)
        self._corpus.update(ts)
        self._docs[intent_id] += 1
        if len(c) > self.max_terms:
            self._prune(c)

    def merge(self, into_id: str, from_id: str) -> None:
        """Fold ``from_id``'s counts into ``into_id`` (intents merged); ``from_id`` is gone."""
        src = self._counts.pop(from_id, Counter())
        dst = self._counts.setdefault(into_id, Counter())
        dst.update(src)
        self._docs[into_id] += self._docs.pop(from_id, 0)
        if len(dst) > self.max_terms:
            self._prune(dst)

    def drop(self, intent_id: str) -> None:
        self._corpus.subtract(self._counts.pop(intent_id, Counter()))
        self._corpus = +self._corpus
        self._docs.pop(intent_id, None)

    def _prune(self, c: Counter[str]) -> None:
        # Keep the top half, so pruning happens once per max_terms/2 new terms (amortised O(1)).
        ranked = sorted(c.items(), key=lambda tc: (-tc[1], tc[0]))
        for t, n in ranked[self.max_terms // 2 :]:
            del c[t]
            self._corpus[t] -= n
            if self._corpus[t] <= 0:
                del self._corpus[t]

    def counts(self, intent_id: str) -> Mapping[str, int]:
        return self._counts.get(intent_id, Counter())

    def docs(self, intent_id: str) -> int:
        return self._docs.get(intent_id, 0)

    def stats(self) -> CorpusStats:
        return CorpusStats(self._corpus, sum(self._corpus.values()), len(self._counts))

    def keyphrases(self, intent_id: str, k: int = 10) -> list[tuple[str, float]]:
        return keyphrases(self.counts(intent_id), self.stats(), k)

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_terms": self.max_terms,
            "docs": dict(self._docs),
            "counts": {i: dict(c) for i, c in self._counts.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> KeyphraseIndex:
        ix = cls(d["max_terms"])
        ix._docs = Counter(d["docs"])
        for i, c in d["counts"].items():
            ix._counts[i] = Counter(c)
            ix._corpus.update(c)
        return ix


@dataclass
class Naming:
    """A (re)computed name. ``renamed``: an earlier, different name existed — version it."""

    intent_id: str
    name: IntentName
    renamed: bool
    previous: str = ""


class Namer:
    """Decides when an intent is named: by keyphrases when first seen, grown ``growth``-fold
    since the last naming, or merged/split (``changed=True``); by the LLM (:meth:`llm_due`)
    when it has no LLM name yet or was merged/split, at most ``llm_max`` times per intent."""

    def __init__(self, index: KeyphraseIndex, *, growth: float = 2.0, llm_max: int = 3) -> None:
        if growth <= 1:
            raise ValueError(f"growth must be > 1, got {growth}")
        self.index = index
        self.growth = growth
        self.llm_max = llm_max
        self._named: dict[str, tuple[str, int]] = {}  # intent id -> (name, size when named)
        self._asked: dict[str, int] = {}  # intent id -> LLM namings asked

    def due(self, intent_id: str, size: int, *, changed: bool = False) -> bool:
        last = self._named.get(intent_id)
        return last is None or changed or size >= self.growth * max(last[1], 1)

    def name(
        self, intent_id: str, size: int, examples: list[str], *, changed: bool = False
    ) -> Naming | None:
        """The keyphrase name of ``intent_id`` if :meth:`due`, else ``None``."""
        if not self.due(intent_id, size, changed=changed):
            return None
        docs = self.index.docs(intent_id)
        named = name_intent(  # a split child has no counts of its own yet: its examples speak
            examples,
            self.index.stats(),
            class_counts=self.index.counts(intent_id) if docs else None,
            n_docs=docs or None,
            taken=frozenset(n for i, (n, _) in self._named.items() if i != intent_id),
        )
        return self.named(intent_id, named, size)

    def named(self, intent_id: str, named: IntentName, size: int) -> Naming:
        """Record ``named`` as the current name of ``intent_id``."""
        previous = self._named.get(intent_id, ("", 0))[0]
        self._named[intent_id] = (named.name, size)
        return Naming(
            intent_id, named, renamed=bool(previous) and previous != named.name, previous=previous
        )

    def llm_due(self, intent_id: str, *, changed: bool) -> bool:
        """Whether to ask the LLM for a name (counted as asked; see :meth:`unanswered`)."""
        asked = self._asked.get(intent_id, 0)
        if asked >= self.llm_max or (asked and not changed):
            return False
        self._asked[intent_id] = asked + 1
        return True

    def unanswered(self, intent_id: str) -> None:
        """The LLM gave no name (skipped or failed): the next change may ask again."""
        if self._asked.get(intent_id, 0) > 0:
            self._asked[intent_id] -= 1

    def asked(self) -> list[str]:
        """The intents the LLM was asked to name at least once."""
        return [i for i, n in self._asked.items() if n > 0]

    def forget(self, intent_id: str) -> None:
        self._named.pop(intent_id, None)
        self._asked.pop(intent_id, None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "growth": self.growth,
            "named": {i: list(v) for i, v in self._named.items()},
            "asked": dict(self._asked),
        }

    def restore(self, d: Mapping[str, Any]) -> None:
        self._named = {i: (n, s) for i, (n, s) in d["named"].items()}
        self._asked = dict(d.get("asked", {}))
