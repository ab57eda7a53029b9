"""The command line as a user meets it: help on every option, --version, sql's FORMAT clause."""

from __future__ import annotations

import argparse

import pytest

from processors.cli import DEFAULT_SQL_FORMAT, build_parser, split_format
from processors.errors import CloseloopError, StoreError
from processors.store import _store_error


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_every_option_of_every_command_has_help() -> None:
    parser = build_parser()
    missing = []
    for name, cmd in {"closeloop": parser, **_subcommands(parser)}.items():
        for action in cmd._actions:
            if isinstance(action, argparse._SubParsersAction | argparse._HelpAction):
                continue
            if not action.help:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, missing


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("closeloop ") and out != "closeloop "


@pytest.mark.parametrize(
    "query, option, expected",
    [
        ("SELECT 1", None, ("SELECT 1", DEFAULT_SQL_FORMAT)),
        ("SELECT 1", "TSV", ("SELECT 1", "TSV")),
        ("SELECT 1 FORMAT TSV", None, ("SELECT 1", "TSV")),
        ("select 1 format JSONEachRow;", None, ("select 1", "JSONEachRow")),
        ("SELECT 1 FORMAT TSV", "tsv", ("SELECT 1", "TSV")),
        # a column or string that says "format" is not a clause
        (
            "SELECT 'FORMAT' AS format_name",
            None,
            ("SELECT 'FORMAT' AS format_name", DEFAULT_SQL_FORMAT),
        ),
    ],
)
def test_sql_takes_the_format_from_the_query(
    query: str, option: str | None, expected: tuple
) -> None:
    assert split_format(query, option) == expected


def test_sql_refuses_two_different_formats() -> None:
    with pytest.raises(CloseloopError, match="FORMAT TSV.*--format.*JSON"):
        split_format("SELECT 1 FORMAT TSV", "JSON")


def test_missing_tables_say_how_to_create_them() -> None:
    err = _store_error(
        "query",
        Exception(
            "Code: 60. DB::Exception: Unknown table expression identifier 'intents'. (UNKNOWN_TABLE)"
        ),
    )
    assert isinstance(err, StoreError)
    assert "closeloop migrate" in str(err) and "closeloop up" in str(err)
    other = _store_error("query", Exception("Code: 62. Syntax error"))
    assert "migrate" not in str(other) and "Syntax error" in str(other)
