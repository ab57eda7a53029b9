"""`closeloop demo` refuses what would fail only minutes later, before it starts anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from processors.cli import main


@pytest.mark.parametrize("name", ["", "  "])
def test_an_empty_reviewer_is_refused_before_the_demo_starts(
    tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--home", str(tmp_path), "--approve-as", name])
    assert exit_.value.code == 2
    assert "--approve-as needs the reviewer's name" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no stack, no demo repository
