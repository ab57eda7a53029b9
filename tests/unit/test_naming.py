from __future__ import annotations

import csv
import json
import re
from collections import defaultdict
from pathlib import Path

import pytest

from processors.config import LLMConfig
from processors.errors import LLMError
from processors.llm import LLM
from processors.understand.naming import (
    PHRASE_MAX_WORDS,
    CorpusStats,
    KeyphraseIndex,
    Namer,
    NameRequest,
    keyphrase_name,
    keyphrases,
    llm_names,
    name_intent,
    terms,
    words,
)
from tests.llm_server import FakeLLMServer

BANKING = Path(__file__).resolve().parents[2] / "examples" / "data" / "banking77" / "train.csv"
CLASSES = [
    "card_arrival",
    "exchange_rate",
    "change_pin",
    "request_refund",
    "lost_or_stolen_phone",
    "top_up_failed",
    "terminate_account",
    "apple_pay_or_google_pay",
]


@pytest.fixture(scope="module")
def clusters() -> dict[str, list[str]]:
    """Small BANKING77 clusters: the first 40 utterances of a few categories."""
    if not BANKING.exists():
        pytest.skip(f"{BANKING} not present")
    out: dict[str, list[str]] = defaultdict(list)
    with BANKING.open() as f:
        for row in csv.DictReader(f):
            if row["category"] in CLASSES and len(out[row["category"]]) < 40:
                out[row["category"]].append(row["text"])
    return dict(out)


@pytest.fixture(scope="module")
def index(clusters: dict[str, list[str]]) -> KeyphraseIndex:
    ix = KeyphraseIndex()
    for cat, texts in clusters.items():
        for t in texts:
            ix.add(cat, t)
    return ix


def test_terms_drop_stop_words_placeholders_and_cross_stopword_bigrams() -> None:
    assert terms("I am still waiting on my card, sent to [EMAIL]") == ["waiting", "card", "sent"]
    assert terms("mail [REDACTED:email] card") == ["mail", "card"]  # capture's placeholder
    assert terms("The new card arrived <CARD_NUMBER>") == [
        "new",
        "card",
        "arrived",
        "new card",
        "card arrived",
    ]


@pytest.mark.parametrize(
    "category, expected_word",
    [
        ("card_arrival", "card"),
        ("exchange_rate", "exchange"),
        ("change_pin", "pin"),
        ("request_refund", "refund"),
        ("lost_or_stolen_phone", "phone"),
        ("top_up_failed", "top"),
        ("apple_pay_or_google_pay", "pay"),
    ],
)
def test_keyphrase_names_of_banking77_clusters(
    index: KeyphraseIndex, clusters: dict[str, list[str]], category: str, expected_word: str
) -> None:
    named = name_intent(clusters[category], index.stats(), class_counts=index.counts(category))
    assert expected_word in named.name.split()
    assert 1 <= len(named.name.split()) <= PHRASE_MAX_WORDS + 1 and named.source == "keyphrases"
    assert expected_word in " ".join(named.keywords)
    # counting the examples directly gives the same name as the online index
    assert name_intent(clusters[category], index.stats()).name == named.name


def test_names_are_distinct_and_deterministic(
    index: KeyphraseIndex, clusters: dict[str, list[str]]
) -> None:
    names = [name_intent(clusters[c], index.stats()).name for c in CLASSES]
    assert len(set(names)) == len(names)
    assert names == [name_intent(clusters[c], index.stats()).name for c in CLASSES]


def test_c_tf_idf_prefers_distinctive_over_frequent_terms() -> None:
    stats = CorpusStats({"account": 100, "card": 10, "pin": 10}, total=120, n_classes=4)
    ranked = keyphrases({"account": 10, "pin": 8}, stats)
    assert [t for t, _ in ranked] == ["pin", "account"]


def test_keyphrase_name_avoids_inflections_and_merges_bigrams() -> None:
    assert (
        keyphrase_name([("activate", 3), ("activating", 2), ("new card", 1)]) == "activate new card"
    )
    assert keyphrase_name([("pin", 3), ("new pin", 2), ("blocked", 1)]) == "new pin blocked"
    assert keyphrase_name([]) == ""


def test_index_merge_drop_and_bound() -> None:
    ix = KeyphraseIndex(max_terms=10)
    ix.add("a", "card arrival delay")
    ix.add("b", "card pin blocked")
    ix.merge("a", "b")
    assert (
        ix.counts("a")["card"] == 2
        and ix.docs("a") == 2
        and ix.counts("b") == {}
        and ix.docs("b") == 0
    )
    assert ix.stats().n_classes == 1
    for k in range(30):
        ix.add("c", f"word{k}a word{k}b")
    assert len(ix.counts("c")) <= 10
    st = ix.stats()
    assert st.total == sum(sum(ix.counts(i).values()) for i in ("a", "c"))
    ix.drop("c")
    assert dict(ix.stats().term_counts) == dict(ix.counts("a"))
    with pytest.raises(ValueError):
        KeyphraseIndex(max_terms=3)


def test_index_round_trips_through_a_dict(index: KeyphraseIndex) -> None:
    copy = KeyphraseIndex.from_dict(json.loads(json.dumps(index.to_dict())))
    assert copy.stats().total == index.stats().total
    assert copy.keyphrases("card_arrival") == index.keyphrases("card_arrival")


# --- with an LLM (real openai client, fake server) ---


def _llm(srv: FakeLLMServer) -> LLM:
    return LLM(LLMConfig(base_url=srv.base_url, api_key="k", timeout_s=5, max_retries=0))


def _request(index: KeyphraseIndex, clusters: dict[str, list[str]], cat: str) -> NameRequest:
    return NameRequest(cat, tuple(clusters[cat]), tuple(p for p, _ in index.keyphrases(cat, 8)))


def test_llm_names_several_intents_in_one_call_from_quoted_examples(
    index: KeyphraseIndex, clusters: dict[str, list[str]]
) -> None:
    answer = {
        "intents": [
            {
                "intent": 1,
                "name": "card arrival delay",
                "description": "Users waiting for a new card to arrive.",
                "keywords": ["card arrival", "delivery"],
            },
            {"intent": 2, "name": "pin change", "description": "Users changing their PIN."},
        ]
    }
    reqs = [_request(index, clusters, c) for c in ("card_arrival", "change_pin")]
    with FakeLLMServer(lambda body: json.dumps(answer)) as srv:
        names, problems = llm_names(reqs, _llm(srv))
    named = names["card_arrival"]
    assert (named.name, named.description, named.keywords, named.source) == (
        "card arrival delay",
        "Users waiting for a new card to arrive",
        ["card arrival", "delivery"],
        "llm",
    )
    assert names["change_pin"].keywords == list(reqs[1].keyphrases)  # none given: keyphrases
    assert problems == [] and len(srv.chat_requests()) == 1
    system, user = (m["content"] for m in srv.chat_requests()[0].body["messages"])
    first = clusters["card_arrival"][0]
    assert first not in system and "account issue" in system and "untrusted" in system
    examples = user.split('<data label="examples 1">\n', 1)[1].split("\n</data>", 1)[0]
    assert json.loads(examples.splitlines()[0]) == {"text": first}
    assert len(examples.splitlines()) == 12  # capped number of examples
    assert first not in user.replace(examples, "")  # user words only inside the data blocks


@pytest.mark.parametrize(
    "entry",
    [
        {"name": "card\narrival", "description": "x"},
        {"name": "a" * 80, "description": "x"},
        {"name": "one two three four five six seven eight nine", "description": "x"},
        {"name": "card arrival", "description": ""},
        {"name": 7, "description": "x"},
        {"description": "x"},
    ],
)
def test_an_unusable_name_is_reported_and_the_others_kept(
    index: KeyphraseIndex, clusters: dict[str, list[str]], entry: dict[str, object]
) -> None:
    good = {"intent": 2, "name": "pin change", "description": "Users changing their PIN."}
    reqs = [_request(index, clusters, c) for c in ("card_arrival", "change_pin")]
    answer = json.dumps({"intents": [{"intent": 1, **entry}, good]})
    with FakeLLMServer(lambda body: answer) as srv:
        names, problems = llm_names(reqs, _llm(srv))
    assert list(names) == ["change_pin"] and len(problems) == 1 and "card_arrival" in problems[0]


@pytest.mark.parametrize(
    "answer",
    ["no json", json.dumps({"intents": "x"}), json.dumps({"intents": [{"intent": 1}]})],
)
def test_no_usable_name_at_all_is_an_error(
    index: KeyphraseIndex, clusters: dict[str, list[str]], answer: str
) -> None:
    with FakeLLMServer(lambda body: answer) as srv, pytest.raises(LLMError):
        llm_names([_request(index, clusters, "card_arrival")], _llm(srv))


def test_llm_down_is_an_error(index: KeyphraseIndex, clusters: dict[str, list[str]]) -> None:
    down = FakeLLMServer(lambda body: (503, {"error": {"message": "overloaded"}}))
    with down as srv, pytest.raises(LLMError):
        llm_names([_request(index, clusters, "change_pin")], _llm(srv))


def test_llm_naming_is_bounded_per_intent(index: KeyphraseIndex) -> None:
    namer = Namer(index, llm_max=2)
    assert namer.llm_due("a", changed=False)  # its first name
    assert not namer.llm_due("a", changed=False)  # grown: the keyphrases follow, not the LLM
    assert namer.llm_due("a", changed=True)  # merged or split
    assert not namer.llm_due("a", changed=True)  # at most llm_max
    namer.unanswered("a")
    assert namer.llm_due("a", changed=True)  # an unanswered request is asked again


# --- when to rename ---


def test_namer_renames_only_on_material_change(clusters: dict[str, list[str]]) -> None:
    ix = KeyphraseIndex()
    for cat in ("exchange_rate", "change_pin", "request_refund"):
        for t in clusters[cat]:
            ix.add(cat, t)
    for t in clusters["card_arrival"][:10]:
        ix.add("x", t)
    namer = Namer(ix)
    first = namer.name("x", 10, [])
    assert first is not None and not first.renamed and first.previous == ""
    assert namer.name("x", 19, []) is None  # grew, but not doubled
    for t in clusters["lost_or_stolen_phone"] * 2:  # the intent drifts to another topic
        ix.add("x", t)
    second = namer.name("x", 20, [])
    assert second is not None and second.renamed and second.previous == first.name.name
    assert "phone" in second.name.name.split()
    same = namer.name("x", 21, [], changed=True)  # merged/split: recomputed, same words
    assert same is not None and not same.renamed

    copy = Namer(ix)
    copy.restore(json.loads(json.dumps(namer.to_dict())))
    assert copy.name("x", 30, []) is None and copy.due("x", 42)
    with pytest.raises(ValueError):
        Namer(ix, growth=1.0)


PLANTED = ("Omar Rossi", "omar_rossi_1241", "UM3OG5", "TR-55912", "4637", "omar@example.com")


@pytest.mark.parametrize("category", CLASSES)
def test_a_name_never_holds_a_planted_name_id_code_or_number(
    clusters: dict[str, list[str]], category: str
) -> None:
    """Customers' details in a few conversations of an intent (the most central ones, even)
    never reach its name: a word must be in many of its conversations, and digits never are."""
    texts = list(clusters[category])
    for k, detail in enumerate(PLANTED):  # each in two conversations of 40, put first
        texts[k] = f"{detail} here. {texts[k]} My name is {detail}, ref {detail}."
        texts[k + len(PLANTED)] = f"{texts[k + len(PLANTED)]} ({detail})"
    ix = KeyphraseIndex()
    for c, ts in clusters.items():
        for t in texts if c == category else ts:
            ix.add(c, t)
    named = Namer(ix).name(category, len(texts), texts[:10])
    assert named is not None
    name = named.name.name.lower()
    assert not any(ch.isdigit() for ch in name), name
    for detail in PLANTED:
        for part in re.split(r"[^a-z0-9]+", detail.lower()):
            assert part not in name.split(), (part, name)


@pytest.mark.parametrize("category", CLASSES)
def test_a_code_every_conversation_holds_never_names_the_intent(
    clusters: dict[str, list[str]], category: str
) -> None:
    """Every conversation of the intent gives an id of one format (letters, a dash, digits):
    the letters are as frequent as any word, and still no part of a name."""
    texts = [
        f"{t} Ref QX-{4100 + k}, order qx_{k}7, or qx {k}41."
        for k, t in enumerate(clusters[category])
    ]
    ix = KeyphraseIndex()
    for c, ts in clusters.items():
        for t in texts if c == category else ts:
            ix.add(c, t)
    named = Namer(ix).name(category, len(texts), texts[:10])
    assert named is not None and "qx" not in named.name.name.lower().split(), named.name.name


def test_a_name_is_a_phrase_users_say_not_a_bag_of_keywords(
    clusters: dict[str, list[str]],
) -> None:
    ix = KeyphraseIndex()
    for c, ts in clusters.items():
        for t in ts:
            ix.add(c, t)
    for c, ts in clusters.items():
        name = Namer(ix).name(c, len(ts), ts[:10]).name.name  # type: ignore[union-attr]
        # the name's words appear in this order, adjacent, in one of the examples
        assert any(name in " ".join(words(t)) for t in ts), (c, name)


@pytest.mark.parametrize("category", CLASSES)
def test_two_intents_of_one_topic_get_two_names(
    clusters: dict[str, list[str]], category: str
) -> None:
    """A topic the model split in two (halves of one category): the second intent's name is
    another phrase of its own examples, not the first one's name again."""
    texts = clusters[category]
    ix = KeyphraseIndex()
    for c, ts in clusters.items():
        for t in ts if c != category else []:
            ix.add(c, t)
    for t in texts:
        ix.add(f"{category}-a", t)
        ix.add(f"{category}-b", t)
    namer = Namer(ix)
    first = namer.name(f"{category}-a", len(texts), texts[:10])
    second = namer.name(f"{category}-b", len(texts), texts[:10])
    assert first is not None and second is not None
    assert second.name.name != first.name.name, first.name.name
    assert any(second.name.name in " ".join(words(t)) for t in texts), second.name.name
    # named again alone (the other forgotten: merged away), it may take the phrase back
    namer.forget(f"{category}-a")
    again = namer.name(f"{category}-b", len(texts), texts[:10], changed=True)
    assert again is not None and again.name.name == first.name.name
