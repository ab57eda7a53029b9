from __future__ import annotations

import numpy as np
import pytest

from processors.understand.intents import IntentModel, IntentSummary, _recentre

DIM = 32


def centres(n: int, seed: int = 0) -> np.ndarray:
    """n orthonormal directions: blobs around them are far apart on the sphere."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(DIM, n)))
    return q.T.astype(np.float32)


def blob(centre: np.ndarray, n: int, rng: np.random.Generator, noise: float = 0.08) -> np.ndarray:
    pts = centre + rng.normal(scale=noise, size=(n, DIM))
    return (pts / np.linalg.norm(pts, axis=1, keepdims=True)).astype(np.float32)


def blobs_stream(k: int = 5, per: int = 120, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    c = centres(k)
    X = np.vstack([blob(c[i], per, rng) for i in range(k)])
    y = np.repeat(np.arange(k), per)
    order = rng.permutation(len(X))
    return X[order], y[order]


def summary(i: IntentSummary) -> tuple[str, int, list[tuple[int, str]], bytes]:
    """An intent's summary, comparable (its centroid as bytes)."""
    return i.intent_id, i.size, i.examples, i.centroid.tobytes()


def model(**kw: object) -> IntentModel:
    settings = {"refine_every": 50, "min_size": 5, "grace": 100}
    settings.update(kw)
    return IntentModel(**settings)  # type: ignore[arg-type]


def test_separable_blobs_give_one_intent_each_and_every_point_a_tag() -> None:
    X, y = blobs_stream()
    m = model()
    tags = [m.learn_one(x, now_ns=i) for i, x in enumerate(X)]
    assert all(isinstance(t, str) and t for t in tags)
    assert len(m.intents()) == 5
    final = [m.predict_one(x) for x in X]
    assert None not in final
    # each true blob maps to exactly one intent and vice versa
    pairs = {(int(a), b) for a, b in zip(y, final)}
    assert len(pairs) == 5 and len({b for _, b in pairs}) == 5
    assert sum(i.size for i in m.intents()) == len(X)
    # the sizes alone, and a few intents alone, are what the whole list says of them
    assert m.sizes() == {i.intent_id: i.size for i in m.intents()}
    few = {i.intent_id for i in m.intents()[1:3]} | {"intent-unknown"}
    assert [summary(i) for i in m.intents(ids=few)] == [
        summary(i) for i in m.intents() if i.intent_id in few
    ]
    # tags given on arrival (through merges) agree with the final model, once the first two
    # refinements (at 10 and 20 points) have seen enough to tell the blobs apart
    assert [m.resolve(t) for t in tags[20:]] == final[20:]
    assert sum(m.resolve(t) == f for t, f in zip(tags, final)) >= len(X) - 5
    assert m.n_seen == len(X)


def test_an_intent_keeps_its_id_as_it_grows() -> None:
    rng = np.random.default_rng(2)
    c = centres(3)
    m = model()
    for i, x in enumerate(np.vstack([blob(c[j], 40, rng) for j in range(3)])):
        m.learn_one(x, now_ns=i)
    first = m.predict_one(c[0])
    assert first is not None
    before = {s.intent_id: s for s in m.intents()}
    version = m.taxonomy_version
    for i, x in enumerate(blob(c[0], 400, rng)):
        assert m.learn_one(x, now_ns=1000 + i) == first
    after = {s.intent_id: s for s in m.intents()}
    assert m.predict_one(c[0]) == first
    assert after[first].size == before[first].size + 400
    assert after[first].created_ns == before[first].created_ns and after[first].updated_ns == 1399
    assert set(after) == set(before) and m.taxonomy_version == version


def test_forced_merge_records_the_change_and_keeps_the_older_larger_id() -> None:
    rng = np.random.default_rng(3)
    c = centres(2)
    near = (c[0] + 1.2 * c[1]) / np.linalg.norm(c[0] + 1.2 * c[1])  # cosine ~0.64 to c[0]
    m = model()
    ts = 0
    for x in np.vstack([blob(c[0], 150, rng, 0.1), blob(near, 100, rng, 0.1)]):
        ts += 1
        m.learn_one(x, now_ns=ts)
    a, b = m.predict_one(c[0]), m.predict_one(near)
    assert a is not None and b is not None and a != b
    version = m.taxonomy_version
    m.merge_threshold = 0.5  # settings are public: loosen; the next refinement merges
    for x in blob(c[0], 50, rng, 0.1):
        ts += 1
        m.learn_one(x, now_ns=ts)
    merged = [ch for ch in m.changes if ch.change == "merged" and ch.intent_id == b]
    assert len(merged) == 1 and merged[0].other_id == a
    assert merged[0].taxonomy_version == version + 1 == m.taxonomy_version
    assert m.resolve(b) == a and m.predict_one(near) == a
    assert [s.intent_id for s in m.intents()] == [a]
    gone = {s.intent_id: s for s in m.intents(include_merged=True)}[b]
    assert gone.status == "merged" and gone.parent_id == a


def test_a_group_that_grows_inside_an_intent_is_split_off_with_its_parent() -> None:
    rng = np.random.default_rng(4)
    c = centres(2)
    near = (c[0] + 1.2 * c[1]) / np.linalg.norm(c[0] + 1.2 * c[1])
    m = model()
    # a handful of "near" points among many: too few to be an intent, they join the big one
    first = np.vstack([blob(c[0], 200, rng, 0.1), blob(near, 4, rng, 0.1)])
    for i, x in enumerate(first[rng.permutation(len(first))]):
        m.learn_one(x, now_ns=i)
    assert len(m.intents()) == 1
    parent = m.intents()[0].intent_id
    for i, x in enumerate(blob(near, 300, rng, 0.1)):
        m.learn_one(x, now_ns=1000 + i)
    child = m.predict_one(near)
    assert m.predict_one(c[0]) == parent and child not in (None, parent)
    assert any(ch.intent_id == child and ch.change in ("split", "created") for ch in m.changes)
    assert {s.intent_id for s in m.intents()} == {parent, child}


def nested_stream(groups: int, per: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``groups`` blobs in 64 dimensions, drawn at random (not orthogonal: some are near)."""
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(groups, 64))
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    X = np.vstack([c[g] + rng.normal(scale=noise, size=(per, 64)) for g in range(groups)])
    X = (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)
    y = np.repeat(np.arange(groups), per)
    order = rng.permutation(len(X))
    return X[order], y[order]


def purity(tags: np.ndarray, y: np.ndarray) -> float:
    """Share of the points that are in their group's most common tag."""
    return sum(np.unique(tags[y == g], return_counts=True)[1].max() for g in np.unique(y)) / len(y)


@pytest.mark.parametrize(
    ("groups", "per", "noise"), [(3, 400, 0.12), (12, 150, 0.1), (40, 60, 0.08), (90, 80, 0.06)]
)
def test_the_default_finds_the_number_of_groups_within_2x_at_every_granularity(
    groups: int, per: int, noise: float
) -> None:
    X, y = nested_stream(groups, per, noise, seed=groups)
    m = IntentModel()  # the one default, never told the number of groups
    arrival = np.array([m.resolve(a) for a in m.learn_many(X, now_ns=1)])
    final = np.array([m.predict_one(x) or "new" for x in X])  # None: would open an intent
    assert groups / 2 <= len(m.intents()) <= 2 * groups
    assert purity(final, y) >= 0.95
    # once warmed up (the second half of the stream), the tags given on arrival agree too
    half = len(X) // 2
    assert purity(arrival[half:], y[half:]) >= 0.9


def nmi(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised mutual information (arithmetic mean of the entropies, as scikit-learn's)."""
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    joint = np.zeros((ai.max() + 1, bi.max() + 1))
    np.add.at(joint, (ai, bi), 1.0)
    joint /= len(a)
    pa, pb = joint.sum(axis=1), joint.sum(axis=0)
    nz = joint > 0
    mi = float((joint[nz] * np.log(joint[nz] / np.outer(pa, pb)[nz])).sum())
    ha, hb = -(pa * np.log(pa)).sum(), -(pb * np.log(pb)).sum()
    return mi / max((ha + hb) / 2, 1e-12)


@pytest.mark.parametrize(("groups", "per", "noise"), [(40, 60, 0.08), (90, 80, 0.06)])
def test_early_tags_follow_their_micro_cluster_into_the_finer_intents_of_re_clusterings(
    groups: int, per: int, noise: float
) -> None:
    X, y = nested_stream(groups, per, noise, seed=groups)
    m = IntentModel(remember=len(X))
    arrival: list[str] = []
    for i in range(0, len(X), 200):  # in batches, re-tagging after each re-clustering
        before = m.reclusterings
        arrival += m.learn_many(X[i : i + 200], now_ns=i)
        if m.reclusterings != before:
            arrival = m.current_tags(range(len(arrival)), arrival)
    retagged = np.array([m.resolve(a) for a in arrival])
    plain = IntentModel()
    merged_only = np.array([plain.resolve(a) for a in plain.learn_many(X, now_ns=1)])
    assert m.reclusterings >= 3
    assert all(m.resolve(a) == a for a in retagged)  # every tag is an active intent
    # the first quarter was tagged while the model knew few intents: following merges only,
    # its tags stay coarse; re-tagged, they agree with the groups
    q = len(X) // 4
    assert nmi(y[:q], retagged[:q]) >= 0.85
    assert nmi(y[:q], retagged[:q]) > nmi(y[:q], merged_only[:q]) + 0.05


def test_a_point_older_than_remember_keeps_its_tag() -> None:
    X, _ = nested_stream(12, 25, 0.1, seed=3)
    m = IntentModel(remember=100)
    tags = m.learn_many(X, now_ns=1)
    assert m.current_tags([199, 300], ["gone", "gone"]) == ["gone", "gone"]
    assert m.current_tags([200], [tags[200]])[0] in {s.intent_id for s in m.intents()}
    # a restored model remembers no points: their tags stay (through merges)
    r = IntentModel(remember=100)
    r.restore(m.snapshot())
    assert r.current_tags([250], ["gone"]) == ["gone"]
    r.learn_many(X[:1], now_ns=2)
    assert r.current_tags([300], ["gone"])[0] in {s.intent_id for s in r.intents()}


def at(c: np.ndarray, other: np.ndarray, sim: float) -> np.ndarray:
    """The unit vector at similarity ``sim`` to unit ``c``, towards ``other`` (orthogonal to c)."""
    return (sim * c + np.sqrt(1 - sim**2) * other).astype(np.float32)


def test_a_stream_that_repeats_itself_keeps_its_novelty_threshold() -> None:
    c = centres(4)
    rng = np.random.default_rng(2)
    m = IntentModel(refine_every=100, novelty_quantile=0.01)  # the threshold: the least of 100
    outlier = at(c[0], c[2], 0.65)  # a micro-cluster of its own, in c[0]'s intent
    first = np.vstack([outlier[None], blob(c[0], 99, rng, 0.01), blob(c[1], 100, rng, 0.01)])
    m.learn_many(first, now_ns=1)
    # the stream repeats itself: every arrival joins its micro-cluster, the outlier too, but one
    # that is near c[1]'s intent and far from its micro-clusters
    m.learn_many(np.vstack([first[:99], at(c[1], c[3], 0.8)[None]]), now_ns=2)
    m.learn_one(first[150], now_ns=3)  # a refinement sets the threshold from those 100
    assert len(m.intents()) == 2
    # the outlier's similarity (0.65) is the least of the 100, not the other arrival's (0.8):
    # a point at 0.72 from c[0] joins its intent instead of opening one
    home = m.predict_one(c[0])
    assert home is not None and m.predict_one(at(c[0], c[3], 0.72)) == home


def test_ids_stay_stable_across_re_clusterings() -> None:
    X, y = nested_stream(12, 800, 0.1, seed=7)
    m = IntentModel()
    m.learn_many(X[:2400], now_ns=1)
    centre_of = {g: X[:2400][y[:2400] == g].mean(axis=0) for g in range(12)}
    before = {g: m.predict_one(c) for g, c in centre_of.items()}
    assert len(set(before.values())) == 12
    reclustered = m._reclustered_at
    m.learn_many(X[2400:], now_ns=2)  # the stream quadruples: two more re-clusterings
    assert m._reclustered_at >= 4 * reclustered
    assert {g: m.predict_one(c) for g, c in centre_of.items()} == before


def test_snapshot_restore_gives_identical_predictions_and_learning() -> None:
    X, _ = blobs_stream(seed=5)
    m = model(examples=3)
    for i, x in enumerate(X[:400]):
        m.learn_one(x, now_ns=i, text=f"utterance {i}")
    r = IntentModel()
    r.restore(m.snapshot())
    assert [r.predict_one(x) for x in X] == [m.predict_one(x) for x in X]
    assert r.changes == m.changes and r.taxonomy_version == m.taxonomy_version
    # both go on identically, reservoir sampling included
    assert [r.learn_one(x, 400 + i, text=str(i)) for i, x in enumerate(X[400:])] == [
        m.learn_one(x, 400 + i, text=str(i)) for i, x in enumerate(X[400:])
    ]
    assert [(s.intent_id, s.size, s.examples) for s in r.intents()] == [
        (s.intent_id, s.size, s.examples) for s in m.intents()
    ]


def test_state_is_bounded_by_intents_not_points() -> None:
    X, _ = blobs_stream(k=3, per=400, seed=6)
    m = model(micro_threshold=0.995, max_micro_per_intent=4, examples=5)
    for i, x in enumerate(X):
        m.learn_one(x, now_ns=i, text=f"t{i}")
    k = len(m.intents())
    assert k == 3
    assert m._m <= 4 * k + m.refine_every  # folded back at every refinement
    for s in m.intents():
        assert 0 < len(s.examples) <= 5
        assert all(isinstance(t, str) for _, t in s.examples)
    # examples stay with the intent their point went to
    final = {s.intent_id: s for s in m.intents()}
    for iid, s in final.items():
        for idx, _ in s.examples:
            assert m.predict_one(X[idx - 1]) == iid


@pytest.mark.parametrize(
    "kw",
    [
        {"threshold": 0.9, "micro_threshold": 0.8},
        {"threshold": -1.0},
        {"refine_every": 0},
        {"max_micro_per_intent": 0},
        {"min_size": -1},
        {"threshold": 0.6, "merge_threshold": 0.5},
        {"recluster_growth": 1.0},
        {"novelty_quantile": 1.0},
        {"min_share": -0.1},
        {"cut_tolerance": 1.0},
    ],
)
def test_bad_settings_raise(kw: dict) -> None:
    with pytest.raises(ValueError):
        IntentModel(**kw)


def test_dimension_mismatch_raises_and_empty_model_predicts_none() -> None:
    m = IntentModel()
    assert m.predict_one(np.ones(4, dtype=np.float32)) is None
    m.learn_one(np.ones(4, dtype=np.float32), now_ns=0)
    with pytest.raises(ValueError):
        m.learn_one(np.ones(5, dtype=np.float32), now_ns=1)


def test_learn_many_learns_exactly_what_learn_one_does() -> None:
    # 600 points with refinements every 100: the batches below straddle them
    xs, _ = blobs_stream(k=6, per=100, seed=4)
    one, many = model(refine_every=100), model(refine_every=100)
    ids_one = [one.learn_one(x, 10**18 + i, text=f"t{i}") for i, x in enumerate(xs)]
    ids_many: list[str] = []
    for start, size in ((0, 1), (1, 130), (131, 250), (381, 219)):
        ids_many += many.learn_many(
            xs[start : start + size],
            10**18 + start,
            texts=[f"t{i}" for i in range(start, start + size)],
        )
    assert len(set(ids_one)) > 3
    assert ids_many == ids_one
    assert [(c.change, c.intent_id, c.other_id) for c in many.changes] == [
        (c.change, c.intent_id, c.other_id) for c in one.changes
    ]
    assert [(i.intent_id, i.size, i.examples) for i in many.intents()] == [
        (i.intent_id, i.size, i.examples) for i in one.intents()
    ]


def test_group_sums_are_exactly_those_of_summing_each_group() -> None:
    # groups of one (which skip the summation), larger groups and an unused id in between
    rng = np.random.default_rng(5)
    msum = rng.normal(size=(40, 8))
    assign = np.r_[rng.integers(0, 6, 30), np.arange(10, 20)]
    sums, dense = _recentre(msum, assign)
    # reduceat's order of summation (not add.reduce's): the old one-call sums, bit for bit
    expected = [np.add.reduceat(msum[assign == g], [0], axis=0)[0] for g in np.unique(assign)]
    assert len(sums) == 16 and (np.bincount(dense) == 1).sum() == 10
    assert np.array_equal(sums, np.array(expected))
    assert np.array_equal(np.unique(assign)[dense], assign)
