"""Kafka messages under the size limit: bundles split, oversize records cut or refused."""

from __future__ import annotations

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from processors.bundles import CUT_MARKER, bundles, fit
from processors.records import Message, TurnRecord


def _turn(cid: str, i: int, size: int) -> TurnRecord:
    history = [Message("user", "q" * size), Message("assistant", "a" * (size // 2))]
    return TurnRecord(cid, "t" * 32, f"span{i}", input_messages=history)


@settings(max_examples=60, deadline=None)
@given(
    st.dictionaries(
        st.text(min_size=1, max_size=8),
        st.lists(st.integers(min_value=0, max_value=3000), min_size=1, max_size=6),
        min_size=1,
        max_size=6,
    ),
    st.integers(min_value=2500, max_value=20000),
)
def test_every_message_fits_and_every_record_arrives_in_order(
    sizes: dict[str, list[int]], limit: int
) -> None:
    groups = {cid: [_turn(cid, i, s) for i, s in enumerate(ss)] for cid, ss in sizes.items()}
    msgs, unfit = bundles(groups, limit)
    assert unfit == []
    got: dict[str, list[str]] = {}
    for m in msgs:
        assert len(m) <= limit
        body = orjson.loads(m)
        assert body["v"] == 1
        for cid, recs in body["conversations"].items():
            got.setdefault(cid, []).extend(r["span_id"] for r in recs)
    assert got == {cid: [f"span{i}" for i in range(len(ss))] for cid, ss in sizes.items()}


def test_small_groups_share_one_message() -> None:
    groups = {f"c{i}": [_turn(f"c{i}", 0, 10)] for i in range(20)}
    msgs, _ = bundles(groups, 1_000_000)
    assert len(msgs) == 1 and len(orjson.loads(msgs[0])["conversations"]) == 20


def test_an_oversize_record_is_cut_with_a_marker() -> None:
    big = _turn("c", 0, 3_000_000)  # one record over 1 MB: the full history of a long chat
    (msg,), unfit = bundles({"c": [big]}, 1_000_000)
    assert unfit == [] and len(msg) <= 1_000_000
    rec = TurnRecord.from_dict(orjson.loads(msg)["conversations"]["c"][0])
    assert rec.span_id == "span0" and rec.conversation_id == "c"
    assert CUT_MARKER.split("{")[0] in rec.input_messages[0].content


def test_a_record_that_cannot_be_cut_is_returned_unfit() -> None:
    many = TurnRecord("c", "t", "s", input_messages=[Message("user", "x")] * 50_000)
    msgs, unfit = bundles({"c": [many], "d": [_turn("d", 0, 10)]}, 100_000)
    assert [cid for cid, _ in unfit] == ["c"]
    assert len(msgs) == 1 and list(orjson.loads(msgs[0])["conversations"]) == ["d"]
    assert fit({"a": "b"}, 1) is None


def test_a_batch_failing_twice_the_same_way_is_known_across_restarts(tmp_path) -> None:
    from types import SimpleNamespace

    from processors.errors import StoreError
    from processors.runtime import FailingBatches

    def ev(p: int, o: int) -> SimpleNamespace:
        return SimpleNamespace(message=SimpleNamespace(topic="otlp_spans", partition=p, offset=o))

    path = tmp_path / "run" / "failing.json"
    batch = [ev(0, 7), ev(0, 8), ev(1, 3)]
    key = FailingBatches.key("capture", batch)
    assert key == FailingBatches.key("capture", [ev(1, 3), ev(0, 7), ev(0, 9)])  # first offsets
    first = FailingBatches(path)
    err = ValueError("message too large")
    assert not first.failed_before(key, err)
    first.remember(key, err)
    again = FailingBatches(path)  # the restarted worker
    assert again.failed_before(key, ValueError("other text, same kind"))
    assert not again.failed_before(key, KeyError("another kind"))
    again.forget(key)
    assert not FailingBatches(path).failed_before(key, err)
    # an outage is never the batch's fault
    assert FailingBatches.is_outage(StoreError("ClickHouse down"))
    try:
        raise RuntimeError("send failed") from ConnectionRefusedError()
    except RuntimeError as e:
        assert FailingBatches.is_outage(e)
    assert not FailingBatches.is_outage(err)
