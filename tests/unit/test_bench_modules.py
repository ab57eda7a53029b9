"""Every bench module imports with what the README's test command installs: a bench whose
imports broke (bench.embedders once imported a function bench.intents no longer had) fails here,
not months later when someone runs it."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
MODULES = sorted(p.stem for p in BENCH.glob("*.py") if p.stem not in ("__init__", "__main__"))


@pytest.mark.parametrize("module", MODULES)
def test_the_bench_module_imports(module: str) -> None:
    mod = importlib.import_module(f"bench.{module}")
    assert mod.__doc__, f"bench.{module} says what it measures in its docstring"
