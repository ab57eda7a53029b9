from __future__ import annotations

import numpy as np
import pytest

from processors.understand.intents import IntentModel

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
    # tags given on arrival (through merges) agree with the final model
    assert [m.resolve(t) for t in tags] == final
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
    near = (c[0] + 0.9 * c[1]) / np.linalg.norm(c[0] + 0.9 * c[1])  # cosine ~0.74 to c[0]
    m = model(threshold=0.85, micro_threshold=0.95)
    a_pts, b_pts = blob(c[0], 150, rng, 0.03), blob(near, 60, rng, 0.03)
    ts = 0
    for x in a_pts:
        ts += 1
        m.learn_one(x, now_ns=ts)
    for x in b_pts:
        ts += 1
        m.learn_one(x, now_ns=ts)
    a, b = m.predict_one(c[0]), m.predict_one(near)
    assert a is not None and b is not None and a != b
    assert [ch.change for ch in m.changes] == ["created", "created"]
    m.threshold, m.merge_threshold = (
        0.6,
        0.7,
    )  # settings are public: loosen; the next refinement merges
    for x in blob(c[0], 50, rng, 0.03):
        ts += 1
        m.learn_one(x, now_ns=ts)
    merged = [ch for ch in m.changes if ch.change == "merged"]
    assert len(merged) == 1
    assert (merged[0].intent_id, merged[0].other_id) == (b, a)
    assert merged[0].taxonomy_version == m.taxonomy_version == 3
    assert m.resolve(b) == a and m.predict_one(near) == a
    assert [s.intent_id for s in m.intents()] == [a]
    gone = {s.intent_id: s for s in m.intents(include_merged=True)}[b]
    assert gone.status == "merged" and gone.parent_id == a


def test_a_split_child_gets_a_new_id_with_its_parent() -> None:
    rng = np.random.default_rng(4)
    c = centres(2)
    near = (c[0] + 0.9 * c[1]) / np.linalg.norm(c[0] + 0.9 * c[1])
    m = model(threshold=0.6, micro_threshold=0.95)
    mixed = np.vstack([blob(c[0], 150, rng, 0.03), blob(near, 60, rng, 0.03)])
    for i, x in enumerate(mixed[rng.permutation(len(mixed))]):
        m.learn_one(x, now_ns=i)
    assert len(m.intents()) == 1
    parent = m.intents()[0].intent_id
    m.threshold = 0.85  # tighten: the next refinement splits the minority off
    for i, x in enumerate(blob(c[0], 50, rng, 0.03)):
        m.learn_one(x, now_ns=1000 + i)
    splits = [ch for ch in m.changes if ch.change == "split"]
    assert len(splits) == 1 and splits[0].other_id == parent
    child = splits[0].intent_id
    assert child != parent and m.predict_one(c[0]) == parent and m.predict_one(near) == child
    assert {s.intent_id: s.parent_id for s in m.intents()} == {parent: "", child: parent}


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
