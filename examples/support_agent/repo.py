"""The agent's own git repository: its system prompt and config, read from the base branch.

closeloop proposes changes to this repository as branches and a person merges them; the
agent reads ``git show main:<path>``, so a merge takes effect at the next cycle without
touching anyone's working tree.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

TEMPLATE = Path(__file__).with_name("repo_template")
BRANCH = "main"
AUTHOR_NAME = "Bankly Dev"
AUTHOR_EMAIL = "dev@bankly.example"
# A fixed date makes the initial commit (and so the first agent version) the same everywhere.
INITIAL_DATE = "2026-01-05T09:00:00+00:00"
PROMPT_PATH = "prompts/system.md"
CONFIG_PATH = "config/agent.yaml"


def git(repo: Path, *args: str, env: dict[str, str] | None = None, strip: bool = True) -> str:
    """Run ``git -C repo args`` and return its stdout; raise with git's stderr on failure."""
    proc = subprocess.run(
        ["git", "-C", str(repo), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed in {repo}: {proc.stderr.strip()}")
    return proc.stdout.strip() if strip else proc.stdout


def init_agent_repo(path: Path) -> str:
    """Create the agent repository at ``path`` (branch ``main``, one commit) and return the
    head sha of ``main``. An existing repository is left as it is."""
    path = Path(path)
    if (path / ".git").exists():
        return git(path, "rev-parse", BRANCH)
    path.mkdir(parents=True, exist_ok=True)
    shutil.copytree(TEMPLATE, path, dirs_exist_ok=True)
    git(path, "init", "-q", "-b", BRANCH)
    git(path, "add", "-A")
    who = {
        "GIT_AUTHOR_NAME": AUTHOR_NAME,
        "GIT_AUTHOR_EMAIL": AUTHOR_EMAIL,
        "GIT_COMMITTER_NAME": AUTHOR_NAME,
        "GIT_COMMITTER_EMAIL": AUTHOR_EMAIL,
        "GIT_AUTHOR_DATE": INITIAL_DATE,
        "GIT_COMMITTER_DATE": INITIAL_DATE,
    }
    git(
        path,
        "-c",
        "commit.gpgsign=false",
        "commit",
        "-q",
        "-m",
        "Bankly support agent: system prompt and config",
        env=who,
    )
    return git(path, "rev-parse", BRANCH)


def read_main(repo: Path, rel_path: str, branch: str = BRANCH) -> str:
    """A file's content on ``branch`` (not the working tree)."""
    return git(Path(repo), "show", f"{branch}:{rel_path}", strip=False)


def short_sha(repo: Path, branch: str = BRANCH) -> str:
    return git(Path(repo), "rev-parse", "--short=7", branch)
