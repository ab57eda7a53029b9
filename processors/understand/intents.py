"""Online intent clustering: learns intents from a stream of unit vectors, never told how many.

Two levels, in the spirit of DBSTREAM/CluStream but with numpy vector math:

* **micro-clusters** — tight groups (cosine >= ``micro_threshold``) updated on every point; they
  are the model's bounded summary of the stream (at most ``max_micro_per_intent`` per intent,
  the smallest folded into their nearest sibling), so state grows with intents, not points.
* **intents** — groups of micro-clusters. Every ``refine_every`` points a *refinement* moves the
  micro-clusters to their nearest intent (weighted spherical k-means, warm-started), opens an
  intent for micro-clusters farther than the *novelty threshold* from all, merges intents whose
  centroids are closer than ``merge_threshold`` and folds intents that stay smaller than
  ``min_size`` past ``grace`` points into their nearest neighbour. Each time the stream has
  grown ``recluster_growth``-fold the refinement starts afresh instead: a *re-clustering* picks
  the granularity from the data — Ward's hierarchy over a weight-proportional sample of the
  micro-clusters, cut where the weighted silhouette is highest (groups holding less than
  ``min_share`` of the points count as unclustered, so a cut cannot win by cutting the data into
  crumbs; of the cuts within ``cut_tolerance`` of the best score the finest, as the silhouette is
  flat near its top and favours the coarsest split of nested groups) — and k-means iterations
  polish that cut. Refinements run every ``refine_every``
  points and, before the first of those, at doublings from ``2 * min_size``; re-clusterings at
  the first of them and then whenever the stream has doubled. Between refinements a point joins
  its micro-cluster's intent, or the nearest intent, or opens a new one when its similarity to
  every intent is below the novelty threshold: the ``novelty_quantile`` quantile of the recent
  arrivals' similarity to their nearest intent, those that joined a micro-cluster included
  (``threshold`` until enough have arrived).

No threshold sets the granularity: on three public intent sets of 77, 64 and 7 intents the
defaults find 93, 77 and 7 (``python -m bench.intents``, bench/RESULTS.md).

A point's tag can follow it to a finer intent: the model remembers the last ``remember`` points
(float16, not checkpointed) and ``current_tags`` gives their nearest intent now (the understand
core re-versions the tags a re-clustering moved).

A refinement maps the new partition onto the old ids by shared weight: each new group inherits
the id that gave it most weight; when several groups share a parent, the largest keeps the id
and the others are *split* children (new id, ``parent_id``); an id that inherits nothing was
*merged* into the group holding most of its weight. Ids are never reused.

>>> import numpy as np
>>> m = IntentModel()
>>> a = m.learn_one(np.array([1.0, 0.0, 0.0], dtype=np.float32), now_ns=1)
>>> m.learn_one(np.array([0.99, 0.1, 0.0], dtype=np.float32), now_ns=2) == a
True
"""

from __future__ import annotations

import io
import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage

from processors.understand.blas import one_blas_thread

SNAPSHOT_VERSION = 2


@dataclass
class IntentChange:
    """One taxonomy change; columns of the ``intent_changes`` table (less the name)."""

    taxonomy_version: int
    intent_id: str
    change: str  # created | merged | split
    other_id: str  # merged: the survivor; split: the parent; created: ""
    ts_ns: int


@dataclass
class IntentSummary:
    intent_id: str
    size: int  # points learned (for a merged intent: when it was merged)
    centroid: np.ndarray
    created_ns: int
    updated_ns: int
    parent_id: str  # merged: the survivor; split child: the parent; else ""
    status: str  # active | merged
    examples: list[tuple[int, str]] = field(default_factory=list)  # (point index, text), bounded


class IntentModel:
    """Online intent clusterer with stable ids (``learn_one`` / ``predict_one``)."""

    def __init__(
        self,
        threshold: float = 0.6,
        *,
        micro_threshold: float = 0.85,
        merge_threshold: float = 0.9,
        min_size: int = 20,
        grace: int = 500,
        refine_every: int = 500,
        refine_iters: int = 10,
        max_micro_per_intent: int = 32,
        recluster_growth: float = 2.0,
        recluster_sample: int = 3000,
        novelty_quantile: float = 0.002,
        min_share: float = 0.003,
        cut_tolerance: float = 0.1,
        examples: int = 10,
        remember: int = 10_000,
        seed: int = 0,
    ) -> None:
        self.threshold = threshold
        self.micro_threshold = micro_threshold
        self.merge_threshold = merge_threshold
        self.min_size = min_size
        self.grace = grace
        self.refine_every = refine_every
        self.refine_iters = refine_iters
        self.max_micro_per_intent = max_micro_per_intent
        self.recluster_growth = recluster_growth
        self.recluster_sample = recluster_sample
        self.novelty_quantile = novelty_quantile
        self.min_share = min_share
        self.cut_tolerance = cut_tolerance
        self.examples = examples
        self.remember = remember
        self.seed = seed
        self._check_settings()
        self._init_state()

    def _check_settings(self) -> None:
        """Bad settings raise ValueError (river's convention: at construction)."""
        if not -1.0 < self.threshold < self.micro_threshold < 1.0:
            raise ValueError(
                f"need -1 < threshold ({self.threshold}) < micro_threshold ({self.micro_threshold}) < 1"
            )
        if not self.threshold < self.merge_threshold <= 1.0:
            raise ValueError(
                f"need threshold ({self.threshold}) < merge_threshold ({self.merge_threshold}) <= 1"
            )
        if (
            min(self.refine_every, self.refine_iters, self.max_micro_per_intent) < 1
            or self.min_size < 0
            or self.grace < 0
            or self.examples < 0
            or self.remember < 0
        ):
            raise ValueError(
                "refine_every, refine_iters, max_micro_per_intent must be >= 1; "
                "min_size, grace, examples, remember >= 0"
            )
        if (
            self.recluster_growth <= 1
            or self.recluster_sample < 10
            or not 0 <= self.novelty_quantile < 1
            or not 0 <= self.min_share < 1
            or not 0 <= self.cut_tolerance < 1
        ):
            raise ValueError(
                "need recluster_growth > 1, recluster_sample >= 10, "
                "0 <= novelty_quantile < 1, 0 <= min_share < 1, 0 <= cut_tolerance < 1"
            )

    def _init_state(self) -> None:
        """The learned state of a new model (``restore`` replaces it)."""
        self._rng = np.random.default_rng(self.seed)
        # the re-clustering's sample has its own stream: examples given or not, the same cuts
        self._cut_rng = np.random.default_rng([self.seed, 1])
        self._dim = 0
        self._n_seen = 0
        self._next_id = 1
        self.taxonomy_version = 0
        self.changes: list[IntentChange] = []
        self._reclustered_at = 0  # n_seen at the last re-clustering (0: none yet)
        self.reclusterings = 0
        # the last ``remember`` points (point n at row n % remember) from point _recent_from on,
        # so that their tags can follow a split (``current_tags``); not checkpointed
        self._recent = np.zeros((0, 0), dtype=np.float16)
        self._recent_from = 0
        self._novelty = self.threshold  # below this similarity to every intent a point opens one
        # since the novelty threshold was last set: each arrival's similarity to its nearest
        # intent (the threshold is a quantile of them)
        self._arrival_sims: list[float] = []
        # micro-clusters: parallel arrays, first _m rows used
        self._m = 0
        self._m_sum = np.zeros((0, 0), dtype=np.float32)
        self._m_cent = np.zeros((0, 0), dtype=np.float32)
        self._m_n = np.zeros(0, dtype=np.int64)
        self._m_intent: list[str] = []
        # intents: metadata by id, plus the active ones' centroids in _order
        self._meta: dict[str, dict[str, Any]] = {}
        self._order: list[str] = []
        self._i_sum = np.zeros((0, 0), dtype=np.float64)
        self._i_cent = np.zeros((0, 0), dtype=np.float32)
        # id -> [[micro index, point index, text], ...]
        self._examples: dict[str, list[list[Any]]] = {}
        self._ex_seen: dict[str, int] = {}  # id -> points offered to the reservoir

    # ---- public protocol -------------------------------------------------------------

    def learn_one(self, x: np.ndarray, now_ns: int, text: str | None = None) -> str:
        """Assign ``x`` to an intent (creating one if it is far from all), learn it, return the id."""
        with one_blas_thread():
            return self._learn_one(x, now_ns, text)

    def _learn_one(self, x: np.ndarray, now_ns: int, text: str | None) -> str:
        x = self._unit(x)
        if self._n_seen and self._n_seen == self._next_refinement(self._n_seen - 1):
            self._refine(now_ns)
        sims = np.vecdot(self._m_cent[: self._m], x) if self._m else np.zeros(0)
        j, intent = self._route_sims(sims, x, learn=True)
        return self._learn_routed(x, j, intent, now_ns, text)[0]

    def learn_many(
        self, xs: np.ndarray, now_ns: int, texts: Sequence[str | None] | None = None
    ) -> list[str]:
        """:meth:`learn_one` for each row of ``xs`` in order, with the same result, faster: the
        similarities to the micro-clusters come from one matrix product per stretch between
        refinements, recomputed only for the micro-clusters the stretch itself changed."""
        if len(xs) == 0:
            return []
        with one_blas_thread():
            return self._learn_many(xs, now_ns, texts)

    def _learn_many(
        self, xs: np.ndarray, now_ns: int, texts: Sequence[str | None] | None
    ) -> list[str]:
        self._unit(xs[0])  # sets the dimension on first use, checks it after
        units = self._normalise(np.asarray(xs, dtype=np.float32).reshape(len(xs), self._dim))
        texts = texts if texts is not None else [None] * len(units)
        out: list[str] = []
        i = 0
        while i < len(units):
            if self._n_seen and self._n_seen == self._next_refinement(self._n_seen - 1):
                self._refine(now_ns)
            # micro-clusters change only through learning and refinement: until the next
            # refinement, a similarity computed now stays valid until its cluster moves, and a
            # point moves (or opens) one cluster, whose column is then refreshed
            stretch = min(len(units) - i, self._next_refinement(self._n_seen) - self._n_seen)
            block = units[i : i + stretch]
            sims = np.empty((stretch, self._m + stretch), dtype=np.float32)
            sims[:, : self._m] = block @ self._m_cent[: self._m].T
            for r in range(stretch):
                j, intent = self._route_sims(sims[r, : self._m], block[r], learn=True)
                intent, j = self._learn_routed(block[r], j, intent, now_ns, texts[i + r])
                out.append(intent)
                if r + 1 < stretch:
                    sims[r + 1 :, j] = np.vecdot(block[r + 1 :], self._m_cent[j])
            i += stretch
        return out

    def _next_refinement(self, n: int) -> int:
        """The first point count after ``n`` at which a refinement runs: every ``refine_every``
        points, and before the first of those at doublings from ``2 * min_size``, so that the
        first arrivals do not wait long for a taxonomy."""
        early = max(2 * self.min_size, 1)
        while early <= n:
            early *= 2
        return min(early, (n // self.refine_every + 1) * self.refine_every)

    def _learn_routed(
        self, x: np.ndarray, j: int, intent: str | None, now_ns: int, text: str | None
    ) -> tuple[str, int]:
        """Learn ``x`` routed to micro-cluster ``j`` (-1: a new one) of ``intent`` (None: a new
        one); the intent and the micro-cluster it joined."""
        if intent is None:
            intent = self._create(now_ns)
        if j < 0:
            j = self._new_micro(x, intent)
        else:
            self._m_sum[j] += x
            self._m_n[j] += 1
            self._m_cent[j] = self._m_sum[j] / np.linalg.norm(self._m_sum[j])
        k = self._order.index(intent)
        self._i_sum[k] += x
        self._i_cent[k] = self._normalise(self._i_sum[k])
        meta = self._meta[intent]
        meta["size"] += 1
        meta["updated_ns"] = now_ns
        if self.remember:
            if self._recent.shape != (self.remember, self._dim):
                self._recent = np.zeros((self.remember, self._dim), dtype=np.float16)
            self._recent[self._n_seen % self.remember] = x
        self._n_seen += 1
        self._offer_example(intent, j, text)
        return intent, j

    def predict_one(self, x: np.ndarray) -> str | None:
        """The intent ``x`` would join, or None if it would open a new one."""
        if self._m == 0:
            return None
        return self._route(self._unit(x))[1]

    def resolve(self, intent_id: str) -> str:
        """Follow merges to the active intent that absorbed ``intent_id`` (itself if active)."""
        seen = set()
        while (
            intent_id in self._meta
            and self._meta[intent_id]["status"] == "merged"
            and intent_id not in seen
        ):
            seen.add(intent_id)
            intent_id = self._meta[intent_id]["parent_id"]
        return intent_id

    def current_tags(self, points: Sequence[int], tags: Sequence[str]) -> list[str]:
        """The tags ``points`` (0-based, in learning order), tagged ``tags`` on arrival, carry
        now: the intent each point is nearest now. A tag given early, while the model knew few
        intents, names a coarse group that later re-clusterings split; following merges cannot
        undo a split, the point itself can. A point more than ``remember`` points old (or
        learned before a restore) keeps its tag, followed through merges."""
        out = [self.resolve(t) for t in tags]
        known = [
            k
            for k, n in enumerate(points)
            if max(self._recent_from, self._n_seen - self.remember) <= n < self._n_seen
        ]
        if known and self._order:
            rows = self._recent[[points[k] % self.remember for k in known]].astype(np.float32)
            nearest = (rows @ self._i_cent.T).argmax(axis=1)
            for k, i in zip(known, nearest):
                out[k] = self._order[int(i)]
        return out

    def intents(
        self, *, include_merged: bool = False, ids: Collection[str] | None = None
    ) -> list[IntentSummary]:
        """The intents (``ids``: only those), each with its examples, most central first."""
        out = []
        position = {iid: k for k, iid in enumerate(self._order)}
        for iid, meta in self._meta.items():
            if (meta["status"] != "active" and not include_merged) or (
                ids is not None and iid not in ids
            ):
                continue
            cent = self._i_cent[position[iid]] if iid in position else np.asarray(meta["centroid"])
            out.append(
                IntentSummary(
                    intent_id=iid,
                    size=int(meta["size"]),
                    centroid=cent.astype(np.float32),
                    created_ns=int(meta["created_ns"]),
                    updated_ns=int(meta["updated_ns"]),
                    parent_id=meta["parent_id"],
                    status=meta["status"],
                    examples=self._central_examples(iid, cent),
                )
            )
        return out

    def sizes(self) -> dict[str, int]:
        """The active intents' sizes: what :meth:`intents` gives without ordering examples."""
        return {iid: int(m["size"]) for iid, m in self._meta.items() if m["status"] == "active"}

    def _central_examples(self, intent_id: str, centroid: np.ndarray) -> list[tuple[int, str]]:
        """The intent's examples, those whose micro-cluster is nearest its centroid first."""
        ex = self._examples.get(intent_id, [])
        if not ex or self._meta[intent_id]["status"] != "active":
            return [(int(i), t) for _, i, t in ex]
        near = self._m_cent[[j for j, _, _ in ex]] @ centroid
        return [(int(ex[k][1]), ex[k][2]) for k in np.argsort(-near, kind="stable")]

    @property
    def n_seen(self) -> int:
        return self._n_seen

    def nbytes(self) -> int:
        """Approximate memory of the learned state (arrays plus example texts)."""
        arrays = sum(
            a.nbytes
            for a in (self._m_sum, self._m_cent, self._m_n, self._i_sum, self._i_cent, self._recent)
        )
        texts = sum(len(t) + 64 for ex in self._examples.values() for _, _, t in ex)
        return arrays + texts + 200 * (len(self._meta) + self._m)

    def snapshot(self) -> bytes:
        """The whole model as bytes (npz: arrays plus a JSON document; no pickle)."""
        state = {
            "version": SNAPSHOT_VERSION,
            "settings": {
                k: getattr(self, k)
                for k in (
                    "threshold",
                    "micro_threshold",
                    "merge_threshold",
                    "min_size",
                    "grace",
                    "refine_every",
                    "refine_iters",
                    "max_micro_per_intent",
                    "recluster_growth",
                    "recluster_sample",
                    "novelty_quantile",
                    "min_share",
                    "cut_tolerance",
                    "examples",
                    "remember",
                    "seed",
                )
            },
            "rng": self._rng.bit_generator.state,
            "cut_rng": self._cut_rng.bit_generator.state,
            "dim": self._dim,
            "n_seen": self._n_seen,
            "next_id": self._next_id,
            "taxonomy_version": self.taxonomy_version,
            "reclustered_at": self._reclustered_at,
            "reclusterings": self.reclusterings,
            "novelty": self._novelty,
            "arrival_sims": self._arrival_sims,
            "changes": [c.__dict__ for c in self.changes],
            "m_intent": self._m_intent[: self._m],
            "order": self._order,
            "meta": {
                k: {**v, "centroid": list(map(float, v["centroid"]))} for k, v in self._meta.items()
            },
            "examples": self._examples,
            "ex_seen": self._ex_seen,
        }
        buf = io.BytesIO()
        np.savez_compressed(
            buf,
            m_sum=self._m_sum[: self._m],
            m_n=self._m_n[: self._m],
            i_sum=self._i_sum,
            state=np.frombuffer(json.dumps(state).encode(), dtype=np.uint8),
        )
        return buf.getvalue()

    def restore(self, data: bytes) -> None:
        """Put the model in the state of :meth:`snapshot`, its settings included."""
        z = np.load(io.BytesIO(data), allow_pickle=False)
        state = json.loads(z["state"].tobytes().decode())
        if state["version"] != SNAPSHOT_VERSION:
            raise ValueError(f"snapshot version {state['version']} is not {SNAPSHOT_VERSION}")
        for name, value in state["settings"].items():
            setattr(self, name, value)
        self._rng = np.random.default_rng(self.seed)
        self._rng.bit_generator.state = state["rng"]
        self._cut_rng = np.random.default_rng([self.seed, 1])
        self._cut_rng.bit_generator.state = state["cut_rng"]
        self._dim, self._n_seen, self._next_id = state["dim"], state["n_seen"], state["next_id"]
        self.taxonomy_version = state["taxonomy_version"]
        self._reclustered_at, self._novelty = state["reclustered_at"], state["novelty"]
        self.reclusterings = state.get("reclusterings", 0)  # added within version 2
        self._recent = np.zeros((0, 0), dtype=np.float16)  # a restored model remembers no points
        self._recent_from = self._n_seen
        # a snapshot taken before every arrival counted has none: its count starts again
        self._arrival_sims = state.get("arrival_sims", [])
        self.changes = [IntentChange(**c) for c in state["changes"]]
        self._m_sum = z["m_sum"].copy()
        self._m_n = z["m_n"].copy()
        self._m = len(self._m_n)
        self._m_cent = self._normalise(self._m_sum)
        self._m_intent = list(state["m_intent"])
        self._order = list(state["order"])
        self._i_sum = z["i_sum"].copy()
        self._i_cent = self._normalise(self._i_sum)
        self._meta = state["meta"]
        self._examples = state["examples"]
        self._ex_seen = state["ex_seen"]

    # ---- internals -------------------------------------------------------------------

    @staticmethod
    def _normalise(m: np.ndarray) -> np.ndarray:
        n = np.linalg.norm(m, axis=-1, keepdims=True)
        return (m / np.maximum(n, 1e-12)).astype(np.float32)

    def _unit(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32).reshape(-1)
        if self._dim == 0:
            self._dim = x.shape[0]
            self._m_sum = np.zeros((64, self._dim), dtype=np.float32)
            self._m_cent = np.zeros((64, self._dim), dtype=np.float32)
            self._m_n = np.zeros(64, dtype=np.int64)
            self._i_sum = np.zeros((0, self._dim), dtype=np.float64)
            self._i_cent = np.zeros((0, self._dim), dtype=np.float32)
        elif x.shape[0] != self._dim:
            raise ValueError(f"vector has {x.shape[0]} dimensions, the model {self._dim}")
        return self._normalise(x)

    def _route(self, x: np.ndarray) -> tuple[int, str | None]:
        """(micro-cluster index or -1, intent id or None) for a unit vector."""
        # np.vecdot, not @: a multithreaded BLAS gemv costs ~10x more per call on small matrices
        return self._route_sims(
            np.vecdot(self._m_cent[: self._m], x) if self._m else np.zeros(0), x
        )

    def _route_sims(
        self, sims: np.ndarray, x: np.ndarray, *, learn: bool = False
    ) -> tuple[int, str | None]:
        """:meth:`_route` given the similarities of ``x`` to the micro-clusters; ``learn``:
        ``x`` is being learnt, its similarity to the intents counts towards the next novelty
        threshold."""
        j = int(sims.argmax()) if len(sims) else -1
        near = j >= 0 and sims[j] >= self.micro_threshold
        if near and not learn:
            return j, self._m_intent[j]
        if not self._order:
            return -1, None
        isims = np.vecdot(self._i_cent, x)
        k = int(isims.argmax())
        if learn:
            # an arrival that joins a micro-cluster counts too: once the stream repeats itself
            # nearly every arrival does, its outliers included, and a quantile of the others
            # alone would climb to the similarity of the one or two that did not
            self._arrival_sims.append(float(isims[k]))
        if near:
            return j, self._m_intent[j]
        return (-1, self._order[k]) if isims[k] >= self._novelty else (-1, None)

    def _record(self, change: str, intent_id: str, other_id: str, now_ns: int) -> None:
        self.taxonomy_version += 1
        self.changes.append(
            IntentChange(self.taxonomy_version, intent_id, change, other_id, now_ns)
        )

    def _create(self, now_ns: int, parent_id: str = "") -> str:
        iid = f"intent-{self._next_id}"
        self._next_id += 1
        self._meta[iid] = {
            "size": 0,
            "created_ns": now_ns,
            "updated_ns": now_ns,
            "parent_id": parent_id,
            "status": "active",
            "born": self._n_seen,
            "centroid": [],
        }
        self._order.append(iid)
        self._i_sum = np.vstack([self._i_sum, np.zeros((1, self._dim))])
        self._i_cent = np.vstack([self._i_cent, np.zeros((1, self._dim), dtype=np.float32)])
        self._examples[iid] = []
        self._ex_seen[iid] = 0
        self._record("split" if parent_id else "created", iid, parent_id, now_ns)
        return iid

    def _new_micro(self, x: np.ndarray, intent: str) -> int:
        if self._m == len(self._m_n):
            grow = len(self._m_n)
            self._m_sum = np.vstack([self._m_sum, np.zeros((grow, self._dim), dtype=np.float32)])
            self._m_cent = np.vstack([self._m_cent, np.zeros((grow, self._dim), dtype=np.float32)])
            self._m_n = np.concatenate([self._m_n, np.zeros(grow, dtype=np.int64)])
        j = self._m
        self._m += 1
        self._m_sum[j] = x
        self._m_cent[j] = x
        self._m_n[j] = 1
        self._m_intent.append(intent)
        return j

    def _offer_example(self, intent: str, micro: int, text: str | None) -> None:
        """Reservoir sampling (Algorithm R) of the texts given with an intent's points."""
        if text is None or self.examples == 0:
            return
        self._ex_seen[intent] += 1
        res = self._examples[intent]
        entry = [micro, self._n_seen, text]
        if len(res) < self.examples:
            res.append(entry)
        else:
            k = int(self._rng.integers(self._ex_seen[intent]))
            if k < self.examples:
                res[k] = entry

    # ---- refinement ------------------------------------------------------------------

    def _refine(self, now_ns: int) -> None:
        self._cap_micro()
        m = self._m
        w = self._m_n[:m].astype(np.float64)
        pts = self._m_cent[:m]
        msum = self._m_sum[:m].astype(np.float64)  # once per refinement, not per regrouping
        recluster = self._n_seen >= self.recluster_growth * max(self._reclustered_at, 1) or (
            self._reclustered_at == 0 and self._n_seen >= 2 * self.min_size
        )
        # a cut needs a few distinct micro-clusters to choose from; until then refine as usual
        recluster = recluster and int((w > 0).sum()) >= 4
        if recluster:
            cents = self._cut(pts, w)
            self._reclustered_at = self._n_seen
            self.reclusterings += 1
        else:
            cents = self._i_cent.copy()
        for _ in range(self.refine_iters):
            # a re-clustering's cut is polished, not re-opened: its granularity is the data's
            assign = (pts @ cents.T).argmax(axis=1) if recluster else self._dp_assign(pts, w, cents)
            sums, assign = _recentre(msum, assign)
            cents, previous = self._normalise(sums), cents
            if np.array_equal(cents, previous):
                break  # a fixed point: the remaining iterations would repeat this one exactly
        # DP-means never merges two centroids by itself: intents that became near-duplicates do here
        while len(cents) > 1:
            sims = cents @ cents.T
            np.fill_diagonal(sims, -2.0)
            a, b = np.unravel_index(int(sims.argmax()), sims.shape)
            if sims[a, b] < self.merge_threshold:
                break
            gw = np.bincount(assign, weights=w, minlength=len(cents))
            light, heavy = (a, b) if gw[a] < gw[b] else (b, a)
            sums, assign = _recentre(msum, np.where(assign == light, heavy, assign))
            cents = self._normalise(sums)
        # intents that stay small past their grace period are folded into their nearest neighbour
        position = {iid: k for k, iid in enumerate(self._order)}
        old_of = np.array([position[i] for i in self._m_intent[:m]])
        born = np.array([self._meta[i]["born"] for i in self._order])
        grp_born = np.full(len(cents), self._n_seen)  # every group has a member: all are set
        np.minimum.at(grp_born, assign, born[old_of])  # one pass, not one per group
        grp_w = np.bincount(assign, weights=w, minlength=len(cents))
        keep = (grp_w >= self.min_size) | (self._n_seen - grp_born < self.grace)
        if keep.any() and not keep.all():
            sums, assign = _recentre(msum, (pts @ cents[keep].T).argmax(axis=1))
        self._reconcile(assign, sums, w, now_ns)
        self._update_novelty()

    def _update_novelty(self) -> None:
        """The novelty threshold: the similarity to their nearest intent under which only
        ``novelty_quantile`` of the arrivals since it was last set fell."""
        rank = int(self.novelty_quantile * len(self._arrival_sims))
        if rank < 1:
            return  # too few arrivals to tell that quantile yet: keep counting
        self._novelty = float(np.partition(self._arrival_sims, rank - 1)[rank - 1])
        self._arrival_sims = []

    def _cut(self, pts: np.ndarray, w: np.ndarray) -> np.ndarray:
        """Centroids of the Ward cut of a weight-proportional sample of the micro-clusters with
        the highest weighted silhouette (see the module's docstring)."""
        draws = self._cut_rng.choice(len(w), self.recluster_sample, p=w / w.sum())
        idx, counts = np.unique(draws, return_counts=True)
        sample, cw = pts[idx].astype(np.float64), counts.astype(np.float64)
        if len(idx) < 3:  # Ward's tree needs three points to offer a choice
            sums = sample * cw[:, None]
            return self._normalise(sums)
        tree = linkage(sample, "ward")
        small = self.min_share * self.recluster_sample  # min_share of the points, in sample weight
        # past 2 / min_share groups most must be smaller than min_share: no better cut lies there
        top = max(2.0, min(len(idx) / 2, 2 / max(self.min_share, 1e-9)))
        cuts = [
            fcluster(tree, k, "maxclust") - 1
            for k in np.unique(np.geomspace(2, top, 24).astype(int))
        ]
        scores = [_silhouette(sample, cw, labels, small) for labels in cuts]
        # the silhouette is flat near its top and favours the coarsest split of nested groups:
        # of the cuts within ``cut_tolerance`` (relative) of the best, the finest
        near = [k for k, sc in enumerate(scores) if sc >= max(scores) * (1 - self.cut_tolerance)]
        best_labels = cuts[max(near, key=lambda k: int(cuts[k].max()))]
        sums = np.zeros((best_labels.max() + 1, sample.shape[1]))
        np.add.at(sums, best_labels, sample * cw[:, None])
        return self._normalise(sums)

    def _dp_assign(self, pts: np.ndarray, w: np.ndarray, cents: np.ndarray) -> np.ndarray:
        """Nearest centroid; micro-clusters beyond ``threshold`` of all open new ones, heaviest first."""
        if len(cents):
            sims = pts @ cents.T
            assign = sims.argmax(axis=1)
            far = np.flatnonzero(sims[np.arange(len(pts)), assign] < self._novelty)
        else:
            assign = np.zeros(len(pts), dtype=np.int64)
            far = np.arange(len(pts))
        new = np.empty((len(far), pts.shape[1]), dtype=pts.dtype)  # the new centres so far
        n_new = 0
        for j in far[np.argsort(-w[far], kind="stable")]:
            if n_new:
                s = new[:n_new] @ pts[j]
                k = int(s.argmax())
                if s[k] >= self._novelty:
                    assign[j] = len(cents) + k
                    continue
            new[n_new] = pts[j]
            n_new += 1
            assign[j] = len(cents) + n_new - 1
        return assign

    def _reconcile(self, assign: np.ndarray, sums: np.ndarray, w: np.ndarray, now_ns: int) -> None:
        """Give the new groups ids: inherit by shared weight, record merges and splits."""
        m = self._m
        old = list(self._order)
        position = {iid: k for k, iid in enumerate(old)}
        old_idx = np.array([position[i] for i in self._m_intent[:m]])
        overlap = np.bincount(
            assign * len(old) + old_idx, weights=w, minlength=len(sums) * len(old)
        ).reshape(len(sums), len(old))
        main = overlap.argmax(axis=1)
        new_ids: list[str] = [""] * len(sums)
        for o in range(len(old)):
            groups = np.flatnonzero(main == o)
            if len(groups) == 0:
                continue
            groups = groups[np.argsort(-overlap[groups, o], kind="stable")]
            new_ids[groups[0]] = old[o]
            for g in groups[1:]:
                new_ids[g] = self._create(now_ns, parent_id=old[o])
        survivors = set(new_ids)
        for o, iid in enumerate(old):
            if iid not in survivors:
                into = new_ids[int(overlap[:, o].argmax())]
                meta = self._meta[iid]
                meta.update(
                    status="merged",
                    parent_id=into,
                    updated_ns=now_ns,
                    centroid=list(map(float, self._i_cent[o])),
                )
                self._record("merged", iid, into, now_ns)
        self._m_intent = [new_ids[g] for g in assign]
        self._order = new_ids
        self._i_sum = sums
        self._i_cent = self._normalise(sums)
        sizes = np.bincount(assign, weights=self._m_n[:m], minlength=len(sums))
        for g, iid in enumerate(new_ids):
            self._meta[iid]["size"] = int(sizes[g])
        self._regroup_examples()

    def _regroup_examples(self) -> None:
        """Examples follow their micro-cluster to its (possibly new) intent, still bounded."""
        pool = [e for iid in list(self._examples) for e in self._examples[iid]]
        for iid in self._order:
            self._examples[iid] = []
        for iid in self._meta:
            if self._meta[iid]["status"] != "active":
                self._examples.pop(iid, None)
        for e in pool:
            self._examples[self._m_intent[e[0]]].append(e)
        for iid in self._order:
            ex = self._examples[iid]
            if len(ex) > self.examples:
                keep = sorted(self._rng.choice(len(ex), self.examples, replace=False))
                self._examples[iid] = [ex[k] for k in keep]
            self._ex_seen[iid] = max(self._ex_seen.get(iid, 0), len(self._examples[iid]))

    def _cap_micro(self) -> None:
        """Fold the lightest micro-clusters into their nearest sibling until within the bound."""
        limit = self.max_micro_per_intent * max(1, len(self._order))
        excess = self._m - limit
        if excess <= 0:
            return
        m = self._m
        alive = np.ones(m, dtype=bool)
        target = np.arange(m)
        intents = np.array(self._m_intent[:m])
        for j in np.argsort(self._m_n[:m], kind="stable"):
            if excess == 0:
                break
            mates = np.flatnonzero(alive & (intents == intents[j]))
            mates = mates[mates != j]
            if len(mates) == 0:
                continue
            k = mates[int((self._m_cent[mates] @ self._m_cent[j]).argmax())]
            self._m_sum[k] += self._m_sum[j]
            self._m_n[k] += self._m_n[j]
            self._m_cent[k] = self._normalise(self._m_sum[k])
            alive[j] = False
            target[j] = k
            excess -= 1
        # compact the arrays; examples follow their micro-cluster
        while not alive[target].all():
            target = target[target]
        new_index = np.cumsum(alive) - 1
        keep = np.flatnonzero(alive)
        n = len(keep)
        self._m_sum[:n] = self._m_sum[keep]
        self._m_cent[:n] = self._m_cent[keep]
        self._m_n[:n] = self._m_n[keep]
        self._m_n[n:m] = 0
        self._m_intent = [self._m_intent[k] for k in keep]
        self._m = n
        for ex in self._examples.values():
            for e in ex:
                e[0] = int(new_index[target[e[0]]])


def _recentre(msum: np.ndarray, assign: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sum of the micro-cluster sums ``msum`` of each non-empty group, assignment renumbered densely)."""
    _, assign = np.unique(assign, return_inverse=True)
    order = np.argsort(assign, kind="stable")  # the rows group by group, in index order within
    sizes = np.bincount(assign)
    single = sizes == 1
    # a group of one is its row: reduceat costs per group and column, and a refinement that
    # opens many intents has mostly groups of one; the larger groups sum the same rows as before
    sums = np.empty((len(sizes), msum.shape[1]), dtype=msum.dtype)
    sums[single] = msum[order[(np.cumsum(sizes) - 1)[single]]]
    rows = order[~single[assign[order]]]
    if len(rows):
        starts = np.cumsum(sizes[~single]) - sizes[~single]
        sums[~single] = np.add.reduceat(msum[rows], starts, axis=0)
    return sums, assign


def _silhouette(x: np.ndarray, w: np.ndarray, labels: np.ndarray, small: float) -> float:
    """Weighted mean silhouette (cosine distance) of unit rows ``x`` with weights ``w``; rows of
    groups lighter than ``small`` score 0, like unclustered points."""
    k = int(labels.max()) + 1
    member = np.zeros((len(x), k))
    member[np.arange(len(x)), labels] = w
    gw = member.sum(axis=0)
    # summed distance to each group: sum_j w_j (1 - x.x_j), through the d x k group sums
    dist = gw[None, :] - x @ (x.T @ member)
    rows = np.arange(len(x))
    rest = gw[labels] - w  # the own group's weight without the row itself
    a = dist[rows, labels] / np.maximum(rest, 1e-12)
    mean = dist / np.maximum(gw, 1e-12)
    mean[rows, labels] = np.inf
    b = mean.min(axis=1)
    s = (b - a) / np.maximum(np.maximum(a, b), 1e-12)
    s = np.where((rest > 0) & (gw[labels] >= small), s, 0.0)
    return float((s * w).sum() / w.sum())
