"""Changes to files of the agent's repository, and the rules every change must pass.

A :class:`Change` is a list of whole-file edits (``path``, ``old``, ``new``). Nothing writes
a change that :func:`validate_change` refused: only allowlisted paths, edits that apply to
the current content, files that still parse (YAML, JSON, TOML, Python), at most
``max_changed_lines`` changed lines, and a change that touches the diagnosis's component
(the prompt file, the named config key, or the harness file).

Structured files are edited in place — the value's text is replaced on its lines, the rest
of the file stays byte for byte — so a diff shows one value, not a re-dumped file. Every
structured edit is checked by parsing both versions and comparing them with the intended
value set, so a formatting corner the line editor does not know becomes a refusal, never
a silently wrong file.
"""

from __future__ import annotations

import ast
import copy
import difflib
import json
import posixpath
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from processors.config import ActTarget
from processors.errors import ActError

FORBIDDEN_DIRS = (".git", ".github")


@dataclass(frozen=True)
class FileEdit:
    """One file's content before and after. ``old`` is what the base branch holds."""

    path: str
    old: str
    new: str


@dataclass
class Change:
    """A proposed change: file edits plus what it is meant to do."""

    edits: list[FileEdit]
    summary: str = ""
    source: str = "template"  # template | llm
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def files(self) -> list[str]:
        return [e.path for e in self.edits]

    def diff(self) -> str:
        """A unified diff (``a/`` and ``b/`` prefixes, as git shows it)."""
        out: list[str] = []
        for e in self.edits:
            out.extend(
                difflib.unified_diff(
                    e.old.splitlines(keepends=True),
                    e.new.splitlines(keepends=True),
                    fromfile=f"a/{e.path}",
                    tofile=f"b/{e.path}",
                )
            )
        return "".join(
            line if line.endswith("\n") else line + "\n\\ No newline at end of file\n"
            for line in out
        )

    def changed_lines(self) -> int:
        """Lines added plus lines removed, over all files."""
        n = 0
        for e in self.edits:
            for line in difflib.unified_diff(
                e.old.splitlines(), e.new.splitlines(), lineterm="", n=0
            ):
                if line.startswith(("+", "-")) and not line.startswith(("+++", "---")):
                    n += 1
        return n

    def diff_stat(self) -> str:
        """``path | +a -b`` per file."""
        rows = []
        for e in self.edits:
            plus = minus = 0
            for line in difflib.unified_diff(
                e.old.splitlines(), e.new.splitlines(), lineterm="", n=0
            ):
                if line.startswith("+") and not line.startswith("+++"):
                    plus += 1
                elif line.startswith("-") and not line.startswith("---"):
                    minus += 1
            rows.append(f"{e.path} | +{plus} -{minus}")
        return "\n".join(rows)


# -- paths -------------------------------------------------------------------------------


def normalize_path(path: str) -> str:
    """The canonical repository-relative form of ``path``, or :class:`ActError`.

    Refuses absolute paths, ``..`` anywhere, backslashes, NUL and anything under ``.git/``
    or ``.github/`` (workflows run with the repository's secrets).
    """
    if not isinstance(path, str) or not path or "\x00" in path or "\\" in path:
        raise ActError(f"refused path {path!r}: not a plain relative path")
    if path.startswith("/") or re.match(r"^[A-Za-z]:", path):
        raise ActError(f"refused path {path!r}: absolute paths are never written")
    if ".." in path.split("/"):
        raise ActError(f"refused path {path!r}: '..' leaves the repository")
    norm = posixpath.normpath(path)
    if norm in (".", "") or norm.startswith("../"):
        raise ActError(f"refused path {path!r}: not a file inside the repository")
    parts = norm.split("/")
    if any(p.lower() in FORBIDDEN_DIRS for p in parts):
        raise ActError(f"refused path {path!r}: .git/ and .github/ are never written")
    return norm


def allowed_path(path: str, targets: Sequence[ActTarget]) -> ActTarget:
    """The allowlist entry for ``path`` (normalised), or :class:`ActError`."""
    norm = normalize_path(path)
    for t in targets:
        if normalize_path(t.path) == norm:
            return t
    raise ActError(
        f"refused path {path!r}: not in act.targets (allowed: "
        f"{', '.join(t.path for t in targets) or 'none'})"
    )


# -- formats -----------------------------------------------------------------------------


def file_format(path: str) -> str:
    """yaml | json | toml | python | text, from the file name."""
    ext = posixpath.splitext(path)[1].lower()
    return {".yaml": "yaml", ".yml": "yaml", ".json": "json", ".toml": "toml", ".py": "python"}.get(
        ext, "text"
    )


def parse(text: str, fmt: str, path: str = "") -> Any:
    """Parse ``text`` as ``fmt``; :class:`ActError` naming the file when it does not parse.

    Python is compiled and its module-level ``NAME = literal`` assignments are returned,
    so that constants can be addressed like config keys.
    """
    where = path or fmt
    try:
        if fmt == "yaml":
            return yaml.safe_load(text)
        if fmt == "json":
            return json.loads(text)
        if fmt == "toml":
            return tomllib.loads(text)
        if fmt == "python":
            compile(text, path or "<harness>", "exec")
            return _python_constants(text)
    except (yaml.YAMLError, ValueError, tomllib.TOMLDecodeError, SyntaxError) as e:
        raise ActError(f"{where} would no longer parse as {fmt}: {e}") from None
    return text


def _python_constants(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for node in ast.parse(text).body:
        target: ast.expr | None = None
        value: ast.expr | None = None
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target, value = node.target, node.value
        if isinstance(target, ast.Name) and value is not None:
            try:
                out[target.id] = ast.literal_eval(value)
            except ValueError:
                continue
    return out


def get_key(data: Any, key: str) -> Any:
    """The value at dotted ``key``; :class:`KeyError` when absent."""
    node = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def _set_key(data: Any, key: str, value: Any) -> Any:
    out = copy.deepcopy(data)
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node[part]
    node[parts[-1]] = value
    return out


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two parsed documents (leaves of mappings)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new), key=str):
            sub = f"{prefix}.{k}" if prefix else str(k)
            if k not in old or k not in new:
                out.append(sub)
            else:
                out.extend(changed_keys(old[k], new[k], sub))
        return out
    return [] if old == new else [prefix]


# -- in-place value editing ----------------------------------------------------------------


def set_value(text: str, fmt: str, key: str, value: Any) -> str:
    """``text`` with the value at dotted ``key`` replaced by ``value``, formatting kept.

    Supports block-style YAML (plain, quoted and ``|``/``>`` block scalars), JSON, TOML
    (tables, dotted keys, basic/literal/multi-line strings) and module-level Python
    constants. The result is verified by parsing; anything else raises :class:`ActError`.
    """
    editor = {"yaml": _yaml_set, "json": _json_set, "toml": _toml_set, "python": _python_set}.get(
        fmt
    )
    if editor is None:
        raise ActError(f"cannot edit a key inside a {fmt} file")
    before = parse(text, fmt)
    try:
        get_key(before, key)
    except KeyError:
        raise ActError(f"key {key!r} does not exist in the {fmt} file") from None
    out = editor(text, key, value)
    after = parse(out, fmt)
    if after != _set_key(before, key, value):
        raise ActError(f"editing {key!r} in place would change more than that key; refused")
    return out


def _json_set(text: str, key: str, value: Any) -> str:
    dec = json.JSONDecoder()

    def ws(i: int) -> int:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    i = ws(0)
    for part in key.split("."):
        if text[i] != "{":
            raise ActError(f"key {key!r}: {part!r} is not inside an object")
        i = ws(i + 1)
        while True:
            if text[i] == "}":
                raise ActError(f"key {key!r} not found")
            name, i = json.decoder.scanstring(text, i + 1)  # type: ignore[attr-defined]
            i = ws(ws(i) + 1)  # past ':'
            if name == part:
                break
            _, i = dec.raw_decode(text, i)
            i = ws(i)
            if text[i] == ",":
                i = ws(i + 1)
    _, end = dec.raw_decode(text, i)
    return text[:i] + json.dumps(value, ensure_ascii=False) + text[end:]


def _scalar_end(rest: str, comment: str) -> int:
    """Length of the scalar at the start of ``rest`` (quoted or plain, before a comment)."""
    if rest[:1] == '"':
        i = 1
        while i < len(rest):
            if rest[i] == "\\":
                i += 2
                continue
            if rest[i] == '"':
                return i + 1
            i += 1
        raise ActError("unterminated quoted string")
    if rest[:1] == "'":
        i = 1
        while i < len(rest):
            if rest[i] == "'":
                if rest[i + 1 : i + 2] == "'":
                    i += 2
                    continue
                return i + 1
            i += 1
        raise ActError("unterminated quoted string")
    m = re.search(rf"\s{re.escape(comment)}", rest)
    return len((rest[: m.start()] if m else rest).rstrip())


_YAML_KEY = re.compile(
    r"^(?P<indent> *)(?P<key>[A-Za-z0-9_][A-Za-z0-9_.\- ]*?|\"[^\"]+\"|'[^']+')"
    r"\s*:(?=\s|$)(?P<rest>.*)$"
)
_BLOCK = re.compile(r"^\s*(?P<style>[|>])(?P<mods>[-+0-9]*)\s*(?:#.*)?$")


def _yaml_render(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a YAML double-quoted scalar
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return repr(value)
    raise ActError(f"only scalar values are edited in place, not {type(value).__name__}")


def _yaml_set(text: str, key: str, value: Any) -> str:
    lines = text.splitlines(keepends=True)
    want = key.split(".")
    stack: list[tuple[int, str]] = []
    skip_deeper_than = -1
    for n, line in enumerate(lines):
        body = line.rstrip("\r\n")
        if not body.strip() or body.lstrip().startswith("#"):
            continue
        indent = len(body) - len(body.lstrip(" "))
        if skip_deeper_than >= 0 and indent > skip_deeper_than:
            continue  # inside a block scalar
        skip_deeper_than = -1
        m = _YAML_KEY.match(body)
        if not m:
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        name = m.group("key").strip().strip("\"'")
        stack.append((indent, name))
        rest = m.group("rest")
        block = _BLOCK.match(rest)
        if block:
            skip_deeper_than = indent
        if [k for _, k in stack] != want:
            continue
        eol = line[len(body) :]
        if block:
            return _yaml_set_block(lines, n, indent, block, value, eol)
        stripped = rest.lstrip()
        if not stripped or stripped.startswith("#"):
            raise ActError(f"key {key!r} holds a mapping or a sequence, not a scalar")
        start = len(body) - len(rest) + (len(rest) - len(stripped))
        end = start + _scalar_end(stripped, "#")
        lines[n] = body[:start] + _yaml_render(value) + body[end:] + eol
        return "".join(lines)
    raise ActError(f"key {key!r} not found in block-style YAML")


def _yaml_set_block(
    lines: list[str], n: int, indent: int, block: re.Match[str], value: Any, eol: str
) -> str:
    if not isinstance(value, str):
        raise ActError("a YAML block scalar can only hold text")
    end = n + 1
    last = n
    content_indent = 0
    while end < len(lines):
        body = lines[end].rstrip("\r\n")
        if body.strip():
            ind = len(body) - len(body.lstrip(" "))
            if ind <= indent:
                break
            content_indent = content_indent or ind
            last = end
        end += 1
    content_indent = content_indent or indent + 2
    header = lines[n].rstrip("\r\n")
    # A folded (>) scalar is re-rendered literal (|): its lines are then kept as written.
    mods = "-" if not value.endswith("\n") else ("+" if value.endswith("\n\n") else "")
    header = header[: header.rindex(block.group("style"))] + "|" + mods
    pad = " " * content_indent
    body_lines = [(pad + ln if ln else "") + eol for ln in value.rstrip("\n").split("\n")]
    if value.endswith("\n\n"):
        body_lines.extend(eol for _ in range(len(value) - len(value.rstrip("\n")) - 1))
    return "".join(lines[:n] + [header + eol] + body_lines + lines[last + 1 :])


_TOML_TABLE = re.compile(r"^\s*\[(?P<name>[^\[\]]+)\]\s*(?:#.*)?$")
_TOML_KEY = re.compile(r"^(?P<indent>\s*)(?P<key>[A-Za-z0-9_\-.\"' ]+?)\s*=\s*(?P<rest>.*)$")


def _toml_render(value: Any, old_literal: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if not isinstance(value, str):
        raise ActError(f"only scalar values are edited in place, not {type(value).__name__}")
    if "\n" in value and old_literal.startswith(("'''", '"""')):
        if old_literal.startswith("'''") and "'''" not in value:
            return "'''\n" + value + "'''"
        esc = value.replace("\\", "\\\\").replace('"""', '""\\"')
        return '"""\n' + esc + '"""'
    return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string


def _toml_set(text: str, key: str, value: Any) -> str:
    table = ""
    pos = 0
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\r\n")
        start = pos
        pos += len(line)
        t = _TOML_TABLE.match(body)
        if t:
            table = ".".join(p.strip().strip("\"'") for p in t.group("name").split("."))
            continue
        m = _TOML_KEY.match(body)
        if not m or body.lstrip().startswith("#"):
            continue
        name = ".".join(p.strip().strip("\"'") for p in m.group("key").split("."))
        if (f"{table}.{name}" if table else name) != key:
            continue
        vstart = start + m.start("rest")
        rest = text[vstart:]
        for quote in ('"""', "'''"):
            if rest.startswith(quote):
                close = rest.find(quote, 3)
                while close != -1 and quote == '"""' and rest[close - 1] == "\\":
                    close = rest.find(quote, close + 1)
                if close == -1:
                    raise ActError("unterminated multi-line string")
                vend = close + 3
                while rest[vend : vend + 1] == quote[0]:  # up to two quotes may end the content
                    vend += 1
                break
        else:
            vend = _scalar_end(rest.split("\n", 1)[0], "#")
        return text[:vstart] + _toml_render(value, rest[:vend]) + text[vstart + vend :]
    raise ActError(f"key {key!r} not found in TOML")


def _python_set(text: str, key: str, value: Any) -> str:
    if "." in key:
        raise ActError(f"{key!r}: only module-level constants of a Python file are edited")
    pattern = re.compile(
        rf"^(?P<head>{re.escape(key)}\s*(?::[^=]+)?=\s*)(?P<rest>.*)$", re.MULTILINE
    )
    m = pattern.search(text)
    if not m:
        raise ActError(f"constant {key!r} not found")
    rest = m.group("rest")
    end = _scalar_end(rest, "#")
    rendered = repr(value)
    return text[: m.start("rest")] + rendered + rest[end:] + text[m.end("rest") :]


# -- validation ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Component:
    """Where a diagnosis says the fix belongs: an allowlisted file and, maybe, a key in it."""

    type: str  # prompt | config | harness
    path: str
    key: str = ""


def apply_find_replace(
    files: dict[str, str], edits: object, targets: Sequence[ActTarget]
) -> list[FileEdit]:
    """Apply ``[{path, find, replace}, ...]`` to ``files``; each ``find`` must occur exactly once.
    ``edits`` is untrusted (an LLM's answer): anything else is an :class:`ActError`."""
    if not isinstance(edits, (list, tuple)) or not edits:
        raise ActError("expected a non-empty list of edits")
    current: dict[str, str] = {}
    for i, e in enumerate(edits):
        if not isinstance(e, dict):
            raise ActError(f"edit {i} is not an object")
        path, find, repl = e.get("path"), e.get("find"), e.get("replace")
        if not (isinstance(path, str) and isinstance(find, str) and isinstance(repl, str)):
            raise ActError(f"edit {i} needs string fields path, find and replace")
        norm = normalize_path(path)
        allowed_path(norm, targets)
        if norm not in files:
            raise ActError(f"edit {i}: {norm} is not a file of the repository")
        text = current.get(norm, files[norm])
        if not find:
            raise ActError(f"edit {i}: 'find' is empty; quote the exact text to replace")
        count = text.count(find)
        if count != 1:
            raise ActError(
                f"edit {i}: 'find' occurs {count} times in {norm}, it must occur exactly once"
            )
        current[norm] = text.replace(find, repl, 1)
    return [FileEdit(p, files[p], new) for p, new in current.items() if new != files[p]]


def validate_change(
    change: Change,
    files: dict[str, str],
    targets: Sequence[ActTarget],
    component: Component,
    max_changed_lines: int,
) -> None:
    """Raise :class:`ActError` with the reason when ``change`` must not be written."""
    if not change.edits:
        raise ActError("the change is empty")
    seen = set()
    for e in change.edits:
        norm = normalize_path(e.path)
        if norm != e.path:
            raise ActError(f"path {e.path!r} is not normalised")
        allowed_path(norm, targets)
        if norm in seen:
            raise ActError(f"{norm} is edited twice")
        seen.add(norm)
        if files.get(norm) != e.old:
            raise ActError(f"{norm} changed since the change was computed; it does not apply")
        if e.old == e.new:
            raise ActError(f"{norm} is not changed by its edit")
        fmt = file_format(norm)
        parse(e.old, fmt, norm)
        parse(e.new, fmt, norm)
    n = change.changed_lines()
    if n > max_changed_lines:
        raise ActError(
            f"the change has {n} changed lines, more than act.max_changed_lines={max_changed_lines}"
        )
    touched = {e.path: e for e in change.edits}
    if component.path not in touched:
        raise ActError(
            f"the change does not touch {component.path}, where the diagnosis "
            f"places the fault ({component.type})"
        )
    if component.key:
        e = touched[component.path]
        fmt = file_format(e.path)
        keys = changed_keys(parse(e.old, fmt), parse(e.new, fmt))
        inside = [k for k in keys if k == component.key or k.startswith(component.key + ".")]
        if not inside:
            raise ActError(f"the change does not modify {component.key!r} in {component.path}")
        if len(inside) != len(keys):
            outside = sorted(set(keys) - set(inside))
            raise ActError(f"the change modifies keys other than {component.key!r}: {outside}")
