"""Understand: every closed conversation gets an intent (learned online) and its tags.

Pure core combining the parts of layer 2:

- the user's goal (the first ``goal_user_turns`` user messages) is embedded (:mod:`.embed`),
- the online intent model assigns it a stable intent id and learns it (:mod:`.intents`),
- the tagger gives the signals and the heuristic outcome (:mod:`.signals`); an outcome the
  conversation states wins (:mod:`.outcomes`),
- the namer names new or materially changed intents (:mod:`.naming`); renames are versioned.

The LLM's part is not done here in line: a batch lists what the LLM may improve
(``judge_requests``, ``name_requests``); the agent runs those beside the stream and hands the
answers back to :meth:`Understand.apply_judgement` and :meth:`Understand.apply_names`, which
return the rows' new versions. :meth:`Understand.improve` does the same in place (the CLI).

A conversation replayed (same id and version) gets the same tags without being learned twice,
so the model does not double count a redelivery.
"""

from __future__ import annotations

import pickle
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from itertools import islice
from typing import Any

import numpy as np

from processors.config import Config
from processors.errors import LLMError
from processors.llm import ChatJSON
from processors.records import Conversation, TagRecord
from processors.understand.embed import Embedder
from processors.understand.intents import IntentModel
from processors.understand.naming import IntentName, KeyphraseIndex, Namer, NameRequest, llm_names
from processors.understand.outcomes import decide
from processors.understand.signals import SignalResult, Tagger, judge

LONG_TAIL_SHARE = 0.01  # an intent holding under 1% of conversations (once warmed up) is long tail
LONG_TAIL_WARMUP = 500
SEEN_CAP = 200_000  # remembered (conversation, version) pairs for replay detection
GOAL_CACHE = 4096  # goals whose vectors are kept (384 float32 each: ~6 MB)


@dataclass
class UnderstandBatch:
    tags: list[TagRecord] = field(default_factory=list)
    intent_rows: list[dict[str, Any]] = field(default_factory=list)
    change_rows: list[dict[str, Any]] = field(default_factory=list)
    judge_requests: list[TagRecord] = field(default_factory=list)  # with their conversation
    name_requests: list[NameRequest] = field(default_factory=list)
    # earlier batches' conversations a re-clustering in this batch moved to another intent
    # (Understand._retag): conversation_id, conversation_version, intent_id, intent_name,
    # taxonomy_version; the agent re-versions their stored tag rows with these
    retags: list[dict[str, Any]] = field(default_factory=list)


def tag_row(tag: TagRecord) -> dict[str, Any]:
    """A ``conversation_tags`` row: the tag without its conversation."""
    d = replace(tag, conversation=None).to_dict()  # not converting the conversation just to drop it
    d.pop("conversation", None)
    d.pop("v", None)
    d["failed"] = int(bool(tag.failed))
    return d


def goal_text(conv: Conversation, turns: int) -> str:
    users = [m.content for m in conv.messages if m.role == "user" and m.content]
    return " ".join(users[: max(1, turns)]) or " ".join(m.content for m in conv.messages[:1])


class Understand:
    def __init__(
        self,
        cfg: Config,
        embedder: Embedder,
        model: IntentModel | None = None,
        *,
        llm_enabled: bool = False,
    ) -> None:
        self.cfg = cfg
        self.embedder = embedder
        self.llm_enabled = llm_enabled  # list what the LLM may improve in each batch
        self.model = model or IntentModel()
        self.tagger = Tagger(cfg, judging=llm_enabled)
        self.index = KeyphraseIndex()
        self.namer = Namer(self.index, llm_max=cfg.llm.naming_max)
        self.names: dict[str, IntentName] = {}
        self._seen: dict[tuple[str, int], tuple[str, int]] = {}  # (cid, version) -> (intent, order)
        # the last ``model.remember`` conversations learned, by their point number in the model,
        # to re-tag when a re-clustering moves them (not checkpointed, like the model's points)
        self._recent: dict[tuple[str, int], int] = {}
        # the vectors of recent goals, least recently used first
        self._goal_vectors: OrderedDict[str, np.ndarray] = OrderedDict()
        self._emitted_changes = 0
        self.naming_version = 0

    # -- the step ----------------------------------------------------------------------------
    def process(self, convs: list[Conversation], now_ns: int) -> UnderstandBatch:
        out = UnderstandBatch()
        if not convs:
            return out
        touched: set[str] = set()
        sizes = self.model.sizes()  # once per batch: long-tail test
        # a conversation version seen before (a redelivery) is tagged again but not learned twice
        keys = [(c.conversation_id, c.version) for c in convs]
        firsts = {key: i for i, key in reversed(list(enumerate(keys)))}
        fresh = [i for i, key in enumerate(keys) if key not in self._seen and firsts[key] == i]
        texts = [goal_text(convs[i], self.cfg.understand.goal_user_turns) for i in fresh]
        first_point, reclusterings = self.model.n_seen, self.model.reclusterings
        learned = dict(zip(fresh, self.model.learn_many(self._embed(texts), now_ns, texts)))
        for i, text in zip(fresh, texts):
            self.index.add(learned[i], text)
            self._remember(keys[i], learned[i])
        for i, conv in enumerate(convs):
            intent_id = learned[i] if i in learned else self.model.resolve(self._seen[keys[i]][0])
            touched.add(intent_id)
            sig = self.tagger.tag(conv, now_ns)
            verdict = decide(
                conv.evaluations,
                (sig.outcome, sig.outcome_turn, sig.outcome_why),
                self.cfg.understand,
            )
            signals = list(sig.tags)
            if self._is_long_tail(sizes.get(intent_id, 1)):
                signals.append("long_tail")
            out.tags.append(
                TagRecord(
                    conversation_id=conv.conversation_id,
                    conversation_version=conv.version,
                    intent_id=intent_id,
                    intent_name=self._name_of(intent_id),
                    taxonomy_version=self.taxonomy_version,
                    signals=sorted(signals),
                    outcome=verdict.outcome,
                    outcome_turn=verdict.turn,
                    failed=verdict.failed,
                    outcome_source=verdict.source,
                    outcome_reason=verdict.reason,
                    prompt_version=conv.prompt_version,
                    model=conv.model,
                    agent_version=conv.agent_version,
                    # arrival time, not the agent's clock: verification splits before/after the merge on it
                    ts_ns=now_ns,
                    conversation=conv,
                )
            )
            if self.tagger.wants_judgement(conv):
                out.judge_requests.append(out.tags[-1])
        changed = self._apply_changes(out, now_ns)
        renamed = self._name(touched | changed, changed, out, now_ns)
        for tag in out.tags:  # names given in this batch apply to its own tags
            tag.intent_id = self.model.resolve(tag.intent_id)
            tag.intent_name = self._name_of(tag.intent_id)
        for point, i in enumerate(fresh, first_point):
            self._recent[keys[i]] = point
        # the oldest first (insertion order); islice copies only the keys that go
        for key in list(islice(self._recent, max(0, len(self._recent) - self.model.remember))):
            del self._recent[key]
        if self.model.reclusterings != reclusterings:
            self._retag(out, {keys[i]: out.tags[i] for i in fresh})
        out.intent_rows = self.intent_rows(touched | changed | renamed, now_ns)
        return out

    def _retag(self, out: UnderstandBatch, batch_tags: dict[tuple[str, int], TagRecord]) -> None:
        """After a re-clustering: every remembered conversation that is now nearest another
        intent than its tag's gets that intent (``IntentModel.current_tags``): this batch's own
        tags in place, earlier ones listed in ``out.retags``."""
        keys = [key for key in self._recent if key in self._seen]
        given = [self._seen[key][0] for key in keys]
        nows = self.model.current_tags([self._recent[key] for key in keys], given)
        for key, old, now in zip(keys, given, nows):
            if now == self.model.resolve(old):
                continue
            self._seen[key] = (now, self._seen[key][1])  # a redelivery gets it too
            tag = batch_tags.get(key)
            if tag is not None:
                tag.intent_id, tag.intent_name = now, self._name_of(now)
                tag.taxonomy_version = self.taxonomy_version
                continue
            out.retags.append(
                dict(
                    conversation_id=key[0],
                    conversation_version=key[1],
                    intent_id=now,
                    intent_name=self._name_of(now),
                    taxonomy_version=self.taxonomy_version,
                )
            )

    def _embed(self, texts: list[str]) -> np.ndarray:
        """The goals' vectors, each distinct goal embedded once, and not again while it is among
        the ``GOAL_CACHE`` most recently seen: the embedder is most of the cost of a batch, and
        goals repeat (greetings, the same first question, a test suite's scripted users)."""
        cache = self._goal_vectors
        new = [t for t in dict.fromkeys(texts) if t not in cache]
        if new:
            cache.update(zip(new, self.embedder.embed(new)))
        for t in texts:
            cache.move_to_end(t)
        if not texts:
            return np.zeros((0, self.embedder.dim), dtype=np.float32)
        out = np.stack([cache[t] for t in texts])
        while len(cache) > GOAL_CACHE:
            cache.popitem(last=False)
        return out

    def _remember(self, key: tuple[str, int], intent_id: str) -> None:
        if len(self._seen) >= SEEN_CAP:
            # forget the oldest half: replays come soon after the original, not days later
            for k in list(self._seen)[: SEEN_CAP // 2]:
                del self._seen[k]
        self._seen[key] = (intent_id, self.model.n_seen)  # order: for debugging a replay

    def _is_long_tail(self, size: int) -> bool:
        """An intent holding under LONG_TAIL_SHARE of the conversations (its size at the batch start)."""
        n = self.model.n_seen
        return n >= LONG_TAIL_WARMUP and size < LONG_TAIL_SHARE * n

    def _apply_changes(self, out: UnderstandBatch, now_ns: int) -> set[str]:
        """Turn the model's taxonomy changes into rows; fold merged intents' keyphrases."""
        changed: set[str] = set()
        for ch in self.model.changes[self._emitted_changes :]:
            if ch.change == "merged":
                self.index.merge(ch.other_id, ch.intent_id)
                self.namer.forget(ch.intent_id)
            changed.update({ch.intent_id, ch.other_id} - {""})
            out.change_rows.append(
                dict(
                    taxonomy_version=ch.taxonomy_version,
                    intent_id=ch.intent_id,
                    change=ch.change,
                    name=self._name_of(ch.intent_id),
                    other_id=ch.other_id,
                    ts_ns=ch.ts_ns,
                )
            )
        self._emitted_changes = len(self.model.changes)
        return changed

    def _name(
        self, ids: set[str], changed: set[str], out: UnderstandBatch, now_ns: int
    ) -> set[str]:
        renamed: set[str] = set()
        sizes = {i.intent_id: i for i in self.model.intents(ids=ids)}
        for iid in sorted(ids):
            s = sizes.get(iid)
            if s is None:
                continue
            examples = [t for _, t in s.examples]
            if self.llm_enabled and self.namer.llm_due(iid, changed=iid in changed):
                out.name_requests.append(
                    NameRequest(
                        iid, tuple(examples), tuple(p for p, _ in self.index.keyphrases(iid, 8))
                    )
                )
            current = self.names.get(iid)
            if current is not None and current.source == "llm":
                continue  # an LLM name stays until the LLM renames the intent
            naming = self.namer.name(iid, s.size, examples, changed=iid in changed)
            if naming is not None:
                self._rename(naming.intent_id, naming.name, naming.previous, out, now_ns)
                renamed.add(iid)
        return renamed

    def _rename(
        self, iid: str, name: IntentName, previous: str, out: UnderstandBatch, now_ns: int
    ) -> None:
        self.names[iid] = name
        if previous and previous != name.name:
            self.naming_version += 1
            out.change_rows.append(
                dict(
                    taxonomy_version=self.taxonomy_version,
                    intent_id=iid,
                    change="renamed",
                    name=name.name,
                    other_id=previous,
                    ts_ns=now_ns,
                )
            )

    # -- the LLM's improvements, when they come ---------------------------------------------
    def apply_names(self, names: dict[str, IntentName], now_ns: int) -> UnderstandBatch:
        """The LLM's names (from :func:`~.naming.llm_names`): new versions of the intents' rows.
        An intent merged away meanwhile is left as it is."""
        out = UnderstandBatch()
        sizes = self.model.sizes()
        done, version = set(), self.naming_version
        for iid, name in names.items():
            if iid not in sizes:
                continue
            naming = self.namer.named(iid, name, sizes[iid])
            self._rename(iid, name, naming.previous, out, now_ns)
            done.add(iid)
        if done and self.naming_version == version:
            self.naming_version += 1  # a new version of the rows even when the name is the same
        if done:
            out.intent_rows = self.intent_rows(done, now_ns)
        return out

    def names_unanswered(self, intent_ids: list[str]) -> None:
        """The LLM named none of these (skipped, failed, unusable): the next change asks again."""
        for iid in intent_ids:
            self.namer.unanswered(iid)

    def apply_judgement(self, tag: TagRecord, verdict: SignalResult) -> TagRecord:
        """``tag`` (from :meth:`process`) with the judge's ``verdict``: its new version."""
        assert tag.conversation is not None, "judge requests carry their conversation"
        sig = self.tagger.judged(tag.conversation, verdict)
        extra = [t for t in tag.signals if t == "long_tail"]
        # the conversation's intent now: a re-clustering may have re-tagged it meanwhile
        seen = self._seen.get((tag.conversation_id, tag.conversation_version))
        iid = self.model.resolve(seen[0] if seen else tag.intent_id)
        return replace(
            tag,
            intent_id=iid,
            intent_name=self._name_of(iid),
            signals=sorted({*sig.tags, *extra}),
            source="llm",
            conversation=None,
        )

    def improve(self, batch: UnderstandBatch, llm: ChatJSON, now_ns: int) -> UnderstandBatch:
        """Run the LLM's part of ``batch`` now, in line (the CLI, where no stream waits):
        the improved rows, written after ``batch``'s. A failed call keeps the batch's rows."""
        out = UnderstandBatch()
        judged = {}
        for tag in batch.judge_requests:
            assert tag.conversation is not None
            try:
                judged[tag.conversation_id] = self.apply_judgement(
                    tag, judge(tag.conversation, llm)
                )
            except LLMError:
                continue
        out.tags = [judged.get(t.conversation_id, t) for t in batch.tags]
        step = self.cfg.llm.naming_batch
        for i in range(0, len(batch.name_requests), step):
            chunk = batch.name_requests[i : i + step]
            try:
                names, _ = llm_names(chunk, llm)
            except LLMError:
                names = {}
            self.names_unanswered([r.intent_id for r in chunk if r.intent_id not in names])
            named = self.apply_names(names, now_ns)
            out.intent_rows += named.intent_rows
            out.change_rows += named.change_rows
        return out

    @property
    def taxonomy_version(self) -> int:
        """Moves forward on every taxonomy change: created, merged, split or renamed."""
        return self.model.taxonomy_version + self.naming_version

    def _name_of(self, intent_id: str) -> str:
        n = self.names.get(intent_id)
        return n.name if n else intent_id

    def intent_rows(self, ids: set[str] | None, now_ns: int) -> list[dict[str, Any]]:
        rows = []
        min_shown = self.cfg.understand.min_examples_shown
        for s in self.model.intents(include_merged=True, ids=ids):
            name = self.names.get(s.intent_id)
            rows.append(
                dict(
                    intent_id=s.intent_id,
                    name=name.name if name else s.intent_id,
                    description=name.description if name else "",
                    keywords=list(name.keywords) if name else [],
                    examples=[t for _, t in s.examples][:5] if s.size >= min_shown else [],
                    size=s.size,
                    status=s.status,
                    parent_id=s.parent_id,
                    taxonomy_version=self.taxonomy_version,
                    created_ns=s.created_ns,
                    updated_ns=now_ns,
                    source=name.source if name else "keyphrases",
                )
            )
        return rows

    # -- checkpoint --------------------------------------------------------------------------
    def snapshot(self) -> bytes:
        state = {
            "model": self.model.snapshot(),
            "tagger": self.tagger.snapshot(),
            "index": self.index.to_dict(),
            "namer": self.namer.to_dict(),
            "names": self.names,
            "seen": self._seen,
            "emitted": self._emitted_changes,
            "naming_version": self.naming_version,
        }
        return zlib.compress(pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL))

    def restore(self, data: bytes) -> None:
        # Only closeloop's own checkpoints (ClickHouse `checkpoints`) are restored: trusted state.
        state = pickle.loads(zlib.decompress(data))
        self.model.restore(state["model"])
        self.tagger.restore(state["tagger"])
        self.index = KeyphraseIndex.from_dict(state["index"])
        self.namer = Namer(self.index, llm_max=self.cfg.llm.naming_max)
        self.namer.restore(state["namer"])
        # LLM work still pending is not checkpointed: an intent asked but not LLM-named yet is
        # asked again on its next conversation
        for iid in self.namer.asked():
            name = state["names"].get(iid)
            if name is None or name.source != "llm":
                self.namer.unanswered(iid)
        self.names = state["names"]
        self._seen = state["seen"]
        self._emitted_changes = state["emitted"]
        self.naming_version = state["naming_version"]
