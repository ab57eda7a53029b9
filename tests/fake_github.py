"""A small in-memory fake of the GitHub REST endpoints closeloop's PyGithub flow uses (loopback only).

::

    with FakeGitHub("acme/agent", {"prompts/system.md": "..."}) as gh:
        cfg.act.github_url = gh.base_url
        ...
        gh.requests          # [Request(method, path, query, body), ...] in order
        gh.merge_pr(1, by="carol")    # what a human does on GitHub

Objects are content-addressed like git's (sha1 of the content), trees are flat
``path -> blob`` maps, and only first-parent history is followed. Endpoints: the
repository, git refs (get/create/update), git commits (get/create), git trees (create),
contents, commits by path, pulls (list/create/get/update), pull reviews, issue comments
(list/create) and labels. Anything else answers 404, so an unexpected call fails the test.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import parse_qs, unquote, urlsplit


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    body: Any


class NotFound(Exception):
    pass


class Unprocessable(Exception):
    pass


def _sha(kind: str, data: bytes) -> str:
    return hashlib.sha1(kind.encode() + b"\x00" + data).hexdigest()


class FakeGitHub:
    """Serve one repository on ``127.0.0.1:<free port>`` while in the ``with`` block."""

    def __init__(
        self,
        full_name: str,
        files: dict[str, str],
        base: str = "main",
        symlinks: dict[str, str] | None = None,
    ) -> None:
        self.full_name = full_name
        self.owner = full_name.split("/")[0]
        self.requests: list[Request] = []
        self.blobs: dict[str, bytes] = {}
        self.trees: dict[str, dict[str, str]] = {}
        self.commits: dict[str, dict[str, Any]] = {}
        self.refs: dict[str, str] = {}
        self.pulls: dict[int, dict[str, Any]] = {}
        self.comments: dict[int, list[str]] = {}
        self.labels: dict[int, list[str]] = {}
        self.reviews: dict[int, list[dict[str, Any]]] = {}
        self.symlinks = dict(symlinks or {})
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        tree = self._tree({p: self._blob(c.encode()) for p, c in files.items()})
        self.refs[f"heads/{base}"] = self._commit("initial", tree, [])

    # -- object store --------------------------------------------------------------------
    def _blob(self, data: bytes) -> str:
        sha = _sha("blob", data)
        self.blobs[sha] = data
        return sha

    def _tree(self, entries: dict[str, str]) -> str:
        sha = _sha("tree", json.dumps(sorted(entries.items())).encode())
        self.trees[sha] = dict(entries)
        return sha

    def _commit(
        self, message: str, tree: str, parents: list[str], author: dict[str, Any] | None = None
    ) -> str:
        sha = _sha("commit", json.dumps([message, tree, parents, len(self.commits)]).encode())
        self.commits[sha] = {
            "message": message,
            "tree": tree,
            "parents": parents,
            "author": author or {"name": "fake", "email": "fake@localhost"},
        }
        return sha

    def file_at(self, ref: str, path: str) -> str | None:
        """A file's text at a branch or commit (for assertions)."""
        blob = self.trees[self.commits[self._resolve(ref)]["tree"]].get(path)
        return self.blobs[blob].decode() if blob else None

    def _resolve(self, ref: str) -> str:
        if f"heads/{ref}" in self.refs:
            return self.refs[f"heads/{ref}"]
        if ref in self.commits:
            return ref
        raise NotFound(ref)

    # -- what a human does on GitHub ---------------------------------------------------------
    def merge_pr(self, number: int, by: str) -> str:
        with self._lock:
            pr = self.pulls[number]
            base = self.refs[f"heads/{pr['base']}"]
            head = self.refs[f"heads/{pr['head']}"]
            merge = self._commit(
                f"Merge pull request #{number}", self.commits[head]["tree"], [base, head]
            )
            self.refs[f"heads/{pr['base']}"] = merge
            pr.update(
                state="closed",
                merged=True,
                merged_by=by,
                merge_commit_sha=merge,
                merged_at="2030-01-02T03:04:05Z",
            )
            return merge

    def add_review(
        self, number: int, user: str, state: str = "APPROVED", commit_id: str | None = None
    ) -> None:
        with self._lock:
            pr = self.pulls[number]
            self.reviews.setdefault(number, []).append(
                {
                    "id": len(self.reviews.get(number, [])) + 1,
                    "user": user,
                    "state": state,
                    "commit_id": commit_id or self.refs[f"heads/{pr['head']}"],
                    "body": "",
                }
            )

    # -- server ----------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def writes(self) -> list[Request]:
        return [r for r in self.requests if r.method != "GET"]

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    # -- JSON shapes -------------------------------------------------------------------------
    @property
    def _api(self) -> str:
        return f"{self.base_url}/repos/{self.full_name}"

    def _repo_json(self) -> dict[str, Any]:
        name = self.full_name.split("/")[1]
        return {
            "id": 1,
            "name": name,
            "full_name": self.full_name,
            "url": self._api,
            "owner": {"login": self.owner, "id": 1, "url": f"{self.base_url}/users/{self.owner}"},
            "default_branch": "main",
            "html_url": f"https://github.example/{self.full_name}",
        }

    def _ref_json(self, ref: str) -> dict[str, Any]:
        sha = self.refs[ref]
        return {
            "ref": f"refs/{ref}",
            "url": f"{self._api}/git/refs/{ref}",
            "node_id": ref,
            "object": {"sha": sha, "type": "commit", "url": f"{self._api}/git/commits/{sha}"},
        }

    def _commit_json(self, sha: str) -> dict[str, Any]:
        c = self.commits[sha]
        return {
            "sha": sha,
            "url": f"{self._api}/git/commits/{sha}",
            "message": c["message"],
            "author": {**c["author"], "date": "2030-01-01T00:00:00Z"},
            "committer": {**c["author"], "date": "2030-01-01T00:00:00Z"},
            "tree": {"sha": c["tree"], "url": f"{self._api}/git/trees/{c['tree']}"},
            "parents": [{"sha": p, "url": f"{self._api}/git/commits/{p}"} for p in c["parents"]],
        }

    def _pull_json(self, n: int) -> dict[str, Any]:
        pr = self.pulls[n]
        head_sha = self.refs.get(f"heads/{pr['head']}", pr.get("head_sha", ""))
        return {
            "url": f"{self._api}/pulls/{n}",
            "id": n,
            "number": n,
            "state": pr["state"],
            "html_url": f"https://github.example/{self.full_name}/pull/{n}",
            "issue_url": f"{self._api}/issues/{n}",
            "title": pr["title"],
            "body": pr["body"],
            "merged": pr["merged"],
            "merge_commit_sha": pr.get("merge_commit_sha"),
            "merged_at": pr.get("merged_at"),
            "merged_by": {"login": pr["merged_by"], "id": 2} if pr.get("merged_by") else None,
            "head": {"ref": pr["head"], "sha": head_sha, "label": f"{self.owner}:{pr['head']}"},
            "base": {
                "ref": pr["base"],
                "sha": self.refs[f"heads/{pr['base']}"],
                "label": f"{self.owner}:{pr['base']}",
            },
            "labels": [{"name": x} for x in self.labels.get(n, [])],
        }

    # -- routes ------------------------------------------------------------------------------
    def _route(self, method: str, path: str, query: dict[str, str], body: Any) -> tuple[int, Any]:
        prefix = f"/repos/{self.full_name}"
        if not path.startswith(prefix):
            raise NotFound(path)
        rest = path[len(prefix) :]
        if method == "GET" and rest == "":
            return 200, self._repo_json()
        if (m := re.fullmatch(r"/git/ref/(.+)", rest)) and method == "GET":
            if m.group(1) not in self.refs:
                raise NotFound(rest)
            return 200, self._ref_json(m.group(1))
        if rest == "/git/refs" and method == "POST":
            ref = body["ref"].removeprefix("refs/")
            if ref in self.refs:
                raise Unprocessable("Reference already exists")
            if body["sha"] not in self.commits:
                raise Unprocessable("Object does not exist")
            self.refs[ref] = body["sha"]
            return 201, self._ref_json(ref)
        if (m := re.fullmatch(r"/git/refs/(.+)", rest)) and method == "PATCH":
            ref = m.group(1)
            if ref not in self.refs:
                raise NotFound(rest)
            new = body["sha"]
            if not body.get("force") and self.refs[ref] not in self._ancestors(new):
                raise Unprocessable("Update is not a fast forward")
            self.refs[ref] = new
            return 200, self._ref_json(ref)
        if (m := re.fullmatch(r"/git/commits/([0-9a-f]{40})", rest)) and method == "GET":
            if m.group(1) not in self.commits:
                raise NotFound(rest)
            return 200, self._commit_json(m.group(1))
        if rest == "/git/trees" and method == "POST":
            entries = dict(self.trees[body["base_tree"]]) if body.get("base_tree") else {}
            for e in body["tree"]:
                entries[e["path"]] = (
                    self._blob(e["content"].encode()) if "content" in e else e["sha"]
                )
            sha = self._tree(entries)
            return 201, {"sha": sha, "url": f"{self._api}/git/trees/{sha}", "tree": []}
        if rest == "/git/commits" and method == "POST":
            if body["tree"] not in self.trees or any(
                p not in self.commits for p in body["parents"]
            ):
                raise Unprocessable("tree or parent does not exist")
            sha = self._commit(body["message"], body["tree"], body["parents"], body.get("author"))
            return 201, self._commit_json(sha)
        if (m := re.fullmatch(r"/contents/(.+)", rest)) and method == "GET":
            p = m.group(1)
            sha = self._resolve(query.get("ref", "main"))
            if p in self.symlinks:
                return 200, {
                    "type": "symlink",
                    "target": self.symlinks[p],
                    "path": p,
                    "name": p.split("/")[-1],
                    "sha": "0" * 40,
                    "size": 0,
                    "url": f"{self._api}/contents/{p}",
                }
            blob = self.trees[self.commits[sha]["tree"]].get(p)
            if blob is None:
                raise NotFound(p)
            data = self.blobs[blob]
            return 200, {
                "type": "file",
                "encoding": "base64",
                "content": base64.b64encode(data).decode(),
                "path": p,
                "name": p.split("/")[-1],
                "sha": blob,
                "size": len(data),
                "url": f"{self._api}/contents/{p}",
            }
        if rest == "/commits" and method == "GET":
            out = []
            sha: str | None = self._resolve(query.get("sha", "main"))
            while sha:
                c = self.commits[sha]
                parent = c["parents"][0] if c["parents"] else None
                mine = self.trees[c["tree"]].get(query.get("path", ""))
                theirs = (
                    self.trees[self.commits[parent]["tree"]].get(query.get("path", ""))
                    if parent
                    else None
                )
                if "path" not in query or mine != theirs:
                    out.append(
                        {
                            "sha": sha,
                            "url": f"{self._api}/commits/{sha}",
                            "commit": self._commit_json(sha),
                        }
                    )
                sha = parent
            return 200, out
        if rest == "/pulls" and method == "GET":
            out = [
                self._pull_json(n)
                for n, pr in sorted(self.pulls.items())
                if ("head" not in query or query["head"] == f"{self.owner}:{pr['head']}")
                and ("base" not in query or query["base"] == pr["base"])
                and (
                    query.get("state", "open") == "all" or query.get("state", "open") == pr["state"]
                )
            ]
            return 200, out
        if rest == "/pulls" and method == "POST":
            if f"heads/{body['head']}" not in self.refs:
                raise Unprocessable("head branch does not exist")
            if any(
                pr["head"] == body["head"] and pr["state"] == "open" for pr in self.pulls.values()
            ):
                raise Unprocessable("A pull request already exists")
            n = len(self.pulls) + 1
            self.pulls[n] = {
                "head": body["head"],
                "base": body["base"],
                "title": body.get("title", ""),
                "body": body.get("body", ""),
                "state": "open",
                "merged": False,
            }
            return 201, self._pull_json(n)
        if m := re.fullmatch(r"/pulls/(\d+)", rest):
            n = int(m.group(1))
            if n not in self.pulls:
                raise NotFound(rest)
            if method == "PATCH":
                self._reopen_or_close(self.pulls[n], body.get("state"))
                for k in ("title", "body", "state"):
                    if k in body:
                        self.pulls[n][k] = body[k]
            return 200, self._pull_json(n)
        if (m := re.fullmatch(r"/pulls/(\d+)/reviews", rest)) and method == "GET":
            n = int(m.group(1))
            return 200, [
                {
                    "id": r["id"],
                    "user": {"login": r["user"], "id": 3},
                    "state": r["state"],
                    "body": r["body"],
                    "commit_id": r["commit_id"],
                    "submitted_at": "2030-01-02T00:00:00Z",
                    "pull_request_url": f"{self._api}/pulls/{n}",
                }
                for r in self.reviews.get(n, [])
            ]
        if (m := re.fullmatch(r"/issues/(\d+)/comments", rest)) and method == "GET":
            n = int(m.group(1))
            return 200, [
                {"id": i + 1, "body": body, "url": f"{self._api}/issues/comments/{i + 1}"}
                for i, body in enumerate(self.comments.get(n, []))
            ]
        if (m := re.fullmatch(r"/issues/(\d+)/comments", rest)) and method == "POST":
            n = int(m.group(1))
            self.comments.setdefault(n, []).append(body["body"])
            cid = sum(len(c) for c in self.comments.values())
            return 201, {
                "id": cid,
                "body": body["body"],
                "url": f"{self._api}/issues/comments/{cid}",
            }
        if (m := re.fullmatch(r"/issues/(\d+)/labels", rest)) and method == "POST":
            n = int(m.group(1))
            names = body if isinstance(body, list) else body.get("labels", [])
            self.labels.setdefault(n, []).extend(
                x for x in names if x not in self.labels.get(n, [])
            )
            return 200, [{"name": x} for x in self.labels[n]]
        raise NotFound(f"{method} {rest}")

    def _reopen_or_close(self, pr: dict[str, Any], state: str | None) -> None:
        """As GitHub: a closed pull request reopens only while its branch is where it was at the
        close (not force-pushed or recreated since)."""
        head = self.refs.get(f"heads/{pr['head']}")
        if state == "closed" and pr["state"] == "open":
            pr["closed_head"] = head
        elif (
            state == "open"
            and pr["state"] == "closed"
            and (pr["merged"] or head is None or head != pr.get("closed_head"))
        ):
            raise Unprocessable("the branch was force-pushed or recreated; cannot reopen")

    def _ancestors(self, sha: str) -> set[str]:
        seen, todo = set(), [sha]
        while todo:
            s = todo.pop()
            if s not in seen and s in self.commits:
                seen.add(s)
                todo.extend(self.commits[s]["parents"])
        return seen

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self, method: str) -> None:
                url = urlsplit(self.path)
                path = unquote(url.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
                body = json.loads(raw) if raw else None
                with fake._lock:
                    fake.requests.append(Request(method, path, query, body))
                    try:
                        status, out = fake._route(method, path, query, body)
                    except NotFound as e:
                        status, out = 404, {"message": "Not Found", "detail": str(e)}
                    except Unprocessable as e:
                        status, out = 422, {"message": str(e)}
                data = json.dumps(out).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._serve("GET")

            def do_POST(self) -> None:
                self._serve("POST")

            def do_PATCH(self) -> None:
                self._serve("PATCH")

            def log_message(self, *args: object) -> None:
                pass

        return Handler
