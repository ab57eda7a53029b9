"""The layer rule of processors/, checked on the import statements of every layer module.

The loop's layers, in order: capture < understand < diagnose < act < review. In a layer folder,
``agent.py`` (the thin faust agent), ``loop.py`` (review's store + backend side, act's store
reads) and ``gateway.py`` (capture's network edge) are the layer's I/O side; every other module
is its pure core. Then:

* no module of a layer imports a later layer;
* a pure module imports, of processors, only the shared root modules (config, errors, records,
  stats, redact, llm), its own layer and earlier layers — so never faust, the store, the
  runtime, the app, the embedded stack or the web page;
* faust is imported by the I/O side only;
* review uses act through act's public surface, the ``processors.act`` package, never its
  modules (it asks act to rebuild a stale proposal with ``processors.act.rebuild_proposal``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ("capture", "understand", "diagnose", "act", "review")
IO_FILES = {"agent.py", "loop.py", "gateway.py"}
SHARED = {"config", "errors", "records", "stats", "redact", "llm"}


def imported(path: Path, package: str, root: Path) -> set[str]:
    """Every module ``path`` imports (lazy and TYPE_CHECKING imports too), relative ones resolved
    against ``package`` (the dotted package holding ``path``); ``from a import b`` imports the
    module ``a.b`` when ``root`` holds one."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            base = base[: len(base) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            out.add(module)
            folder = root.joinpath(*module.split("."))
            out |= {
                f"{module}.{a.name}"
                for a in node.names
                if (folder / f"{a.name}.py").is_file() or (folder / a.name).is_dir()
            }
    return out


def problems(module: str, layer: str, io_side: bool, imports: set[str]) -> list[str]:
    """What breaks the layer rule in the imports of ``module`` (of ``layer``)."""
    rank = LAYERS.index(layer)
    found = []
    for name in sorted(imports):
        parts = name.split(".")
        top = parts[0]
        if top == "faust" and not io_side:
            found.append(f"{module} imports faust (only agent.py may)")
        if top != "processors" or len(parts) < 2:
            continue
        other = parts[1]
        if other in LAYERS and LAYERS.index(other) > rank:
            found.append(f"{module} imports {name}, of a later layer ({other})")
        elif not io_side and other not in SHARED and other not in LAYERS:
            found.append(f"{module} is a pure core and imports {name}")
        elif layer == "review" and other == "act" and len(parts) > 2:
            found.append(f"{module} imports {name}: review may use only processors.act")
    return found


def check(root: Path) -> list[str]:
    """Every break of the layer rule in the package tree ``root/processors``."""
    found = []
    for layer in LAYERS:
        for path in sorted((root / "processors" / layer).glob("*.py")):
            module = f"processors.{layer}.{path.stem}"
            io_side = path.name in IO_FILES
            found += problems(module, layer, io_side, imported(path, f"processors.{layer}", root))
    return found


def test_processors_keep_the_layer_rule() -> None:
    assert check(ROOT) == []


def write_tree(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / "processors" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


ALLOWED = {
    "capture/core.py": "from processors.config import Config\nfrom . import otlp\n",
    "diagnose/core.py": "from processors.understand.intents import IntentModel\n",
    "diagnose/agent.py": "import faust\nfrom processors.store import Store\n",
    "review/core.py": "from processors.act import BRANCH_PREFIX\n",
    "review/loop.py": "from processors.store import Store\nfrom processors.act import proposal_rows\n",
    "act/gitrepo.py": "",
    "store.py": "",
}


def test_the_checker_accepts_a_tree_that_keeps_the_rule(tmp_path: Path) -> None:
    write_tree(tmp_path, ALLOWED)
    assert check(tmp_path) == []


@pytest.mark.parametrize(
    ("rel", "text", "why"),
    [
        ("capture/core.py", "from processors.review.core import apply\n", "later layer"),
        ("act/agent.py", "import processors.review.loop\n", "later layer"),
        ("understand/core.py", "from ..diagnose import core\n", "later layer"),
        ("diagnose/core.py", "import faust\n", "imports faust"),
        ("act/core.py", "from processors.store import Store\n", "pure core"),
        ("act/fixes.py", "from processors import store\n", "pure core"),
        ("review/loop.py", "from processors.act import gitrepo\n", "only processors.act"),
        ("understand/core.py", "from processors.runtime import Pipeline\n", "pure core"),
        ("capture/core.py", "from processors.embedded.broker import free_port\n", "pure core"),
        ("review/core.py", "def f():\n    from processors.app import build_app\n", "pure core"),
        ("review/loop.py", "from processors.act.core import Actor\n", "only processors.act"),
    ],
)
def test_the_checker_fails_on_a_forbidden_arrow(
    tmp_path: Path, rel: str, text: str, why: str
) -> None:
    write_tree(tmp_path, {**ALLOWED, rel: ALLOWED.get(rel, "") + text})
    found = check(tmp_path)
    assert found and all(why in f for f in found), found
