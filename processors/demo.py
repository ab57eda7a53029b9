"""``closeloop demo``: the whole loop on the embedded stack, with the Bankly demo agent.

Cycle 1: the agent (its prompt and config in a git repository closeloop targets) serves
simulated customers whose goals and wording come from BANKING77; its spans go over OTLP to
the gateway → capture → assemble → understand (intents learned, conversations tagged) →
diagnose (root causes) → act (a proposal branch with a diff). A human reviews: interactively,
or ``--approve-as NAME`` (still recorded as that person's approval). The agent picks up the
merged files (a new version); cycle 2 runs; verification reports a verdict per intent.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from processors.config import HOME_CONFIG, Config, config_for, load_config
from processors.embedded.stack import EmbeddedStack, wait_for
from processors.errors import CloseloopError, StoreError
from processors.store import Store

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_SETTINGS: dict[str, Any] = {
    # abandoned conversations (the user just leaves) close after this much silence
    "assemble": {"idle_timeout_s": 3.0},
    # a few hundred conversations over ~13 intents: ~45 per intent per cycle
    "diagnose": {"min_support": 15, "min_failures": 6},
    "review": {"min_after": 15},
}
WAIT_PIPELINE_S = 300.0
WAIT_LOOP_S = 120.0


@dataclass
class DemoResult:
    repo: Path
    proposals: list[dict[str, Any]]
    approved: list[str]
    outcomes: list[dict[str, Any]]
    diagnoses: list[dict[str, Any]]
    cycles: list[Any]  # the agent's own reports (true intent and outcome per conversation)


def _say(msg: str) -> None:
    print(msg, flush=True)


def demo_config(home: Path, repo: Path, base: dict[str, Any] | None = None) -> Path:
    """Write the demo's closeloop.yaml into the home (over the settings already there): act
    targets the agent's repository."""
    path = home / HOME_CONFIG  # where every command with --home finds it
    if base is None and path.is_file():
        base = yaml.safe_load(path.read_text()) or {}
    data: dict[str, Any] = dict(base or {})
    data.update({k: {**data.get(k, {}), **v} for k, v in DEMO_SETTINGS.items()})
    data["home"] = str(home)
    data["act"] = {
        **data.get("act", {}),
        "backend": "local",
        "repo": str(repo),
        "base": "main",
        "targets": [
            {"path": "prompts/system.md", "kind": "prompt"},
            {"path": "config/agent.yaml", "kind": "config"},
        ],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def wait_until(what: str, fn: Any, timeout_s: float) -> Any:
    value = wait_for(fn, timeout_s, 1.0)
    if not value:
        _say(f"  (gave up waiting for {what} after {timeout_s:.0f}s)")
    return value


def _count(store: Store, sql: str, params: dict[str, Any] | None = None) -> int:
    """A count for progress polling; a failed poll counts as nothing yet (the next one retries)."""
    try:
        return int(store.scalar(sql, params) or 0)
    except StoreError as e:
        _say(f"  (store busy: {e}; retrying)")
        return 0


def run_cycle_and_wait(
    store: Store, repo: Path, endpoint: str, n: int, seed: int, label: str
) -> Any:
    from examples.support_agent import run_cycle

    before = _count(store, "SELECT count() FROM conversation_tags FINAL")
    last = [0.0]

    def progress(done: int, total: int) -> None:
        if time.monotonic() - last[0] > 2 or done == total:
            last[0] = time.monotonic()
            print(f"\r  {label}: {done}/{total} conversations sent", end="", flush=True)

    report = run_cycle(repo, endpoint, n=n, seed=seed, progress=progress, mode="scripted")
    print(flush=True)
    _say(
        f"  agent version {report.agent_version}: {len(report.conversations)} conversations exported"
    )
    tagged = wait_until(
        "every conversation to be tagged",
        lambda: _count(store, "SELECT count() FROM conversation_tags FINAL") - before >= n,
        WAIT_PIPELINE_S,
    )
    got = _count(store, "SELECT count() FROM conversation_tags FINAL") - before
    _say(
        f"  captured, assembled and tagged: {got}/{n} conversations"
        + ("" if tagged else " (partial)")
    )
    return report


LISTED_INTENT_MIN = 5  # conversations an intent needs to be listed by name


def show_intents(store: Store) -> None:
    rows = store.query("""
        SELECT i.name AS name, t.n AS n, round(t.fail, 2) AS fail
        FROM (SELECT * FROM intents FINAL WHERE status = 'active') AS i
        INNER JOIN (SELECT intent_id, count() AS n, avg(failed) AS fail FROM conversation_tags FINAL
                    GROUP BY intent_id) AS t ON t.intent_id = i.intent_id
        ORDER BY n DESC LIMIT 20""")
    # the long tail (a stray conversation or two each) is counted, not listed
    shown = [r for r in rows if r["n"] >= LISTED_INTENT_MIN]
    _say(f"  {len(rows)} intents learned (largest first): name · conversations · failure rate")
    for r in shown:
        _say(f"    {r['name'][:50]:<50} {r['n']:>5}  {r['fail']:.0%}")
    if len(shown) < len(rows):
        tail = rows[len(shown) :]
        _say(f"    ... and {len(tail)} small ones ({sum(r['n'] for r in tail)} conversations)")


REVIEW_ATTEMPTS = 10  # a proposal that keeps moving is shown again at most this often


def review_step(store: Store, cfg: Config, approve_as: str | None) -> list[str]:
    from processors.act import open_backend

    props = store.query(
        "SELECT proposal_id, title, diff, branch, version FROM proposals FINAL "
        "WHERE status = 'open' ORDER BY created_ns"
    )
    approved = []
    backend = open_backend(cfg)
    for p in props:
        _say(f"\n  proposal {p['proposal_id']}: {p['title']}\n  branch {p['branch']}\n")
        _say("\n".join("    " + ln for ln in p["diff"].splitlines()))
        who = approve_as if approve_as is not None else ask_approval()
        if who is None:
            continue
        record = approve_shown(
            store, cfg, backend, p["proposal_id"], int(p["version"]), who, ask=approve_as is None
        )
        if record is None:
            continue
        where = (
            f"already in {cfg.act.base} at"
            if "already holds" in record.comment
            else f"merged into {cfg.act.base} as"
        )
        _say(f"  approved by {record.reviewer}; {where} {record.merged_commit[:10]}")
        approved.append(p["proposal_id"])
    return approved


def ask_approval() -> str | None:
    """The reviewer's name if the human at the terminal approves, else None."""
    if not sys.stdin.isatty():
        _say(
            "  (no terminal: not approving; rerun with --approve-as NAME or use `closeloop review`)"
        )
        return None
    if input("  approve this change? [y/N] ").strip().lower() != "y":
        return None
    return input("  your name (recorded with the approval): ").strip()


def approve_shown(
    store: Store,
    cfg: Config,
    backend: Any,
    proposal_id: str,
    version: int,
    who: str,
    *,
    ask: bool,
) -> Any:
    """Approve the version that was shown. A proposal that moved meanwhile (re-versioned by a
    newer diagnosis, or rebuilt on a new base) is shown again and approved as shown (asking
    the human again when ``ask``); one withdrawn meanwhile (its diagnosis superseded by a
    rule's) is not approved. The review record, or None if not approved."""
    from processors.act.loop import load_proposal
    from processors.errors import ReviewError
    from processors.review.loop import MovedProposal, StaleProposal, decide

    for _ in range(REVIEW_ATTEMPTS):
        try:
            record, _ = decide(
                store,
                backend,
                proposal_id,
                "approve",
                who,
                "approved in closeloop demo",
                time.time_ns(),
                cfg=cfg,
                version=version,
            )
            return record
        except ReviewError as e:
            moved = e.proposal if isinstance(e, MovedProposal | StaleProposal) else None
            now = moved or load_proposal(store, proposal_id)
            if now is not None and now.status == "closed":
                _say(f"  proposal {proposal_id} was withdrawn: its diagnosis was superseded")
                return None
            if moved is None:
                raise
            _say(f"  {e}\n")
            _say("\n".join("    " + ln for ln in moved.diff.splitlines()))
            version = moved.version
            if ask and ask_approval() is None:
                return None
            time.sleep(1)  # a branch ahead of its row: the row follows within moments
    _say(f"  proposal {proposal_id} kept moving; not approved (use `closeloop review` later)")
    return None


def show_verdicts(outcomes: list[dict[str, Any]]) -> None:
    """Each fixed intent's verdict, then the other intents (controls) once each."""
    targets = [r for r in outcomes if r["target"]]
    target_ids = {r["intent_id"] for r in targets}
    controls: dict[str, dict[str, Any]] = {}
    for r in outcomes:
        if r["intent_id"] not in target_ids and r["verdict"] != "not_enough_data":
            controls.setdefault(r["intent_id"], r)
    _say("  verification, failure rate before → after (two-proportion z and Fisher's exact tests):")
    for r in sorted(targets, key=lambda r: str(r["intent"])):
        _say(
            f"    fixed intent  {str(r['intent'])[:36]:<36} {r['rate_before']:>4.0%} → {r['rate_after']:>4.0%}  "
            f"{r['verdict']:<15} p={r['p_value']:.2g}  (n {r['before_n']} → {r['after_n']})"
        )
    for r in sorted(controls.values(), key=lambda r: str(r["intent"])):
        _say(
            f"    control       {str(r['intent'])[:36]:<36} {r['rate_before']:>4.0%} → {r['rate_after']:>4.0%}  "
            f"{r['verdict']:<15} p={r['p_value']:.2g}  (n {r['before_n']} → {r['after_n']})"
        )


def run_demo(
    cfg: Config, config_file: Path, n: int, seed: int, approve_as: str | None
) -> DemoResult:
    repo = Path(cfg.act.repo)
    stack = EmbeddedStack(cfg, config_file=str(config_file)).start()
    sql_url = stack.sql_url
    try:
        with stack.supervised():  # a child that dies is restarted, as under `closeloop up`
            result = _demo_on(stack, cfg, repo, n, seed, approve_as)
    finally:
        stack.stop()
    _say(
        f"\nDone. Look at:\n  the diff:     git -C {repo} log -p -1 main\n"
        f'  the tables:   closeloop sql --home {cfg.home_path} "SELECT * FROM outcomes FINAL"\n'
        f"  the page:     closeloop up --home {cfg.home_path}  (then open the review page)\n"
        f"  (the store was served at {sql_url} while the demo ran)"
    )
    return result


def _demo_on(
    stack: EmbeddedStack, cfg: Config, repo: Path, n: int, seed: int, approve_as: str | None
) -> DemoResult:
    from examples.support_agent import init_agent_repo

    store = stack.sql_store()
    endpoint = f"http://{cfg.otlp.host}:{cfg.otlp.http_port}"
    _say(f"\n[1/5] the stack is up (OTLP {endpoint}, SQL {stack.sql_url}); agent repository {repo}")
    _say(f"      agent version {init_agent_repo(repo)[:7]}")
    _say("\n[2/5] cycle 1: simulated customers talk to the agent")
    cycles = [run_cycle_and_wait(store, repo, endpoint, n, seed, "cycle 1")]
    show_intents(store)
    _say("\n[3/5] diagnose and act: waiting for root causes and proposals")
    wait_until(
        "proposals",
        lambda: _count(store, "SELECT count() FROM proposals FINAL") >= 1,
        WAIT_LOOP_S,
    )
    time.sleep(5)  # let the other intents' diagnoses arrive too
    diagnoses = store.query(
        "SELECT diagnosis_id, intent_name, rule, summary, trace_ids FROM diagnoses FINAL "
        "ORDER BY failure_rate DESC"
    )
    for d in diagnoses:
        _say(f"  · [{d['rule']}] {d['summary']}\n      evidence: {', '.join(d['trace_ids'][:3])}")
    _say("\n[4/5] review: a human decides")
    approved = review_step(store, cfg, approve_as)
    if not approved:
        _say("  nothing approved: the loop stops here (nothing is ever applied without a human)")
    _say("\n[5/5] cycle 2: the agent runs the merged prompt and config")
    cycles.append(run_cycle_and_wait(store, repo, endpoint, n, seed + 1, "cycle 2"))
    outcomes: list[dict[str, Any]] = []
    if approved:

        def verdicts() -> list[dict[str, Any]]:
            rows = store.query(
                "SELECT o.proposal_id AS proposal_id, o.intent_id AS intent_id, i.name AS intent, o.verdict "
                "AS verdict, o.rate_before AS rate_before, o.rate_after AS rate_after, o.p_value AS p_value, "
                "o.before_n AS before_n, o.after_n AS after_n, p.intent_id = o.intent_id AS target "
                "FROM (SELECT * FROM outcomes FINAL) AS o "
                "LEFT JOIN (SELECT * FROM intents FINAL) AS i ON i.intent_id = o.intent_id "
                "INNER JOIN (SELECT * FROM proposals FINAL) AS p ON p.proposal_id = o.proposal_id "
                "WHERE o.ts_ns > {t:UInt64}",
                {"t": cycle2_done},
            )
            # every approved change measured on all of cycle 2 (its tags were in before
            # cycle2_done); a small intent's verdict may be not_enough_data, and says so
            measured = {r["proposal_id"] for r in rows if r["target"]}
            return rows if measured >= set(approved) else []

        cycle2_done = time.time_ns()
        outcomes = wait_until("verdicts", verdicts, WAIT_LOOP_S) or []
        show_verdicts(outcomes)
    props = store.query("SELECT proposal_id, status, branch, title FROM proposals FINAL")
    return DemoResult(repo, props, approved, outcomes, diagnoses, cycles)


def cmd_demo(a: argparse.Namespace) -> int:
    if a.approve_as is not None and not a.approve_as.strip():
        # before minutes of simulation, not at the review step (an unset $USER gives "")
        raise CloseloopError(
            "--approve-as needs the reviewer's name, and got an empty one "
            '(is $USER unset? try --approve-as "$(whoami)")'
        )
    base = config_for(getattr(a, "config", None), getattr(a, "home", None))
    home = base.home_path
    repo = home / "demo" / "bankly-agent"
    cfg_file = demo_config(home, repo)
    # ports: the stack replaces a taken default port by a free one and says which it bound
    cfg = load_config(cfg_file, overrides={"home": str(home)})
    if REPO_ROOT.joinpath("examples").is_dir() and str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    try:
        import examples.support_agent  # noqa: F401
    except ImportError as e:
        if e.name and e.name.split(".")[0] == "examples":
            raise CloseloopError(
                "the demo agent lives in the source checkout (examples/support_agent); "
                "run closeloop demo from a clone of the repository"
            ) from e
        raise CloseloopError(
            f"the demo agent cannot be imported: {e}; reinstall closeloop "
            "(pip install -e .) to get its dependencies"
        ) from e
    t0 = time.monotonic()
    result = run_demo(cfg, cfg_file, a.conversations, a.seed, a.approve_as)
    _say(f"(demo took {time.monotonic() - t0:.0f}s)")
    return 0 if result.proposals else 1
