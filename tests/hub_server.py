"""A tiny Hub-compatible HTTP server, so the real `huggingface_hub` client can be tested offline.

Only the routes that `create_repo`, `create_branch`, `upload_folder`/`create_commit`, `model_info`,
`snapshot_download`/`hf_hub_download` and `from_pretrained` call are served (read from huggingface_hub 2.4):

    POST /api/repos/create                           -> {"url"}; 409 if it exists
    POST /api/validate-yaml                          -> YAML front matter must parse to a mapping
    POST /api/models/{ns}/{name}/preupload/{rev}     -> every file "regular": base64 in the commit, no LFS/xet
    POST /api/models/{ns}/{name}/commit/{rev}        -> NDJSON header + file/deletedFile lines
    POST /api/models/{ns}/{name}/branch/{branch}     -> branch from "startingPoint" (default: main)
    GET  /api/models/{ns}/{name}[/revision/{rev}]    -> {"id", "sha", "siblings", "private"}
    GET  /api/models/{ns}/{name}/tree/{rev}[/{path}] -> [{"type", "path", "size", "oid"}]
    HEAD/GET /{ns}/{name}/resolve/{rev}/{path}       -> bytes + X-Repo-Commit, ETag, Content-Length

Repo ids must be `namespace/name`. Errors carry the `X-Error-Code` header (`RepoNotFound`,
`RevisionNotFound`, `EntryNotFound`) that `huggingface_hub.utils.hf_raise_for_status` maps to its exceptions.
Anything else is a 404 without a code and is recorded in `HubServer.unhandled`, so a test can see a client route
we do not serve.
Repositories live on disk: `<root>/<ns>/<name>/refs/<branch>` holds a commit sha and
`<root>/<ns>/<name>/commits/<sha>/` the full file tree of that commit.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import yaml


def git_blob_sha(data: bytes) -> str:
    """The git object id of a file: what the Hub returns as `oid` / `ETag` for a non-LFS file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubError(Exception):
    def __init__(self, status: int, code: str | None, message: str, commit: str | None = None, **body):
        super().__init__(message)
        self.status, self.code, self.commit, self.body = status, code, commit, body


class RepoStore:
    """Repositories as directories: one full tree per commit, one file per branch."""

    def __init__(self, root: Path):
        self.root, self.lock = root, threading.Lock()

    def repo(self, repo_id: str) -> Path:
        path = self.root / repo_id
        if not (path / "refs").is_dir():
            raise HubError(404, "RepoNotFound", f"Repository {repo_id} not found")
        return path

    def resolve(self, repo_id: str, revision: str) -> str:
        """Branch name or full commit sha -> commit sha."""
        repo = self.repo(repo_id)
        if (repo / "refs" / revision).is_file():
            return (repo / "refs" / revision).read_text()
        if len(revision) == 40 and (repo / "commits" / revision).is_dir():
            return revision
        raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")

    def files(self, repo_id: str, sha: str) -> dict[str, Path]:
        tree = self.root / repo_id / "commits" / sha
        return {p.relative_to(tree).as_posix(): p for p in sorted(tree.rglob("*")) if p.is_file()}

    def create(self, repo_id: str, private: bool, url: str) -> None:
        with self.lock:
            if (self.root / repo_id / "refs").is_dir():
                # The Hub's 409 carries the repo url: `create_repo(exist_ok=True)` reads it from the error body.
                raise HubError(409, None, "You already created this model repo", url=url)
            (self.root / repo_id / "refs").mkdir(parents=True)
            (self.root / repo_id / "private").write_text(json.dumps(private))
            self._write_commit(repo_id, "main", None, {".gitattributes": b"# local test hub: no LFS\n"}, [], "initial")

    def commit(self, repo_id: str, branch: str, files: dict[str, bytes], deleted: list[str], message: str) -> str:
        with self.lock:
            if not (self.repo(repo_id) / "refs" / branch).is_file():
                raise HubError(404, "RevisionNotFound", f"Invalid rev id: {branch}")
            return self._write_commit(repo_id, branch, self.resolve(repo_id, branch), files, deleted, message)

    def branch(self, repo_id: str, branch: str, start: str) -> None:
        with self.lock:
            ref = self.repo(repo_id) / "refs" / branch
            if ref.exists():
                raise HubError(409, None, f"Reference {branch} already exists")
            ref.write_text(self.resolve(repo_id, start))

    def _write_commit(self, repo_id, branch, parent, files, deleted, message) -> str:
        commits = self.root / repo_id / "commits"
        tree = dict(self.files(repo_id, parent)) if parent else {}
        contents = {path: p.read_bytes() for path, p in tree.items() if path not in deleted}
        contents.update(files)
        digest = hashlib.sha1(f"{parent}\n{message}".encode())
        for path in sorted(contents):
            digest.update(f"{path}\0{git_blob_sha(contents[path])}\n".encode())
        sha = digest.hexdigest()
        for path, data in contents.items():
            (commits / sha / path).parent.mkdir(parents=True, exist_ok=True)
            (commits / sha / path).write_bytes(data)
        (commits / sha).mkdir(parents=True, exist_ok=True)  # an empty tree is still a commit
        (self.root / repo_id / "refs" / branch).write_text(sha)
        return sha


class HubHandler(BaseHTTPRequestHandler):
    server: HubServer

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        self.query = parse_qs(url.query)
        self.server.log.append(f"{method} {url.path}")
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) if method == "POST" else b""
        try:
            route = self._route(method, parts)
            if route is None:
                self.server.unhandled.append(f"{method} {url.path}")
                raise HubError(404, None, f"no route {method} {url.path}")
            route(body)
        except Exception as err:  # noqa: BLE001 - a server bug must reach the test as an HTTP error
            if not isinstance(err, HubError):
                self.server.unhandled.append(f"{method} {url.path}: {err!r}")
                err = HubError(500, None, repr(err))
            headers = {"X-Error-Message": str(err)} | ({"X-Error-Code": err.code} if err.code else {})
            if err.commit:
                headers["X-Repo-Commit"] = err.commit
            self._send(err.status, json.dumps({"error": str(err), **err.body}).encode(), headers)

    def _route(self, method: str, parts: list[str]):
        if parts[:1] == ["api"]:
            if method == "POST" and parts[1:] == ["repos", "create"]:
                return self._create_repo
            if method == "POST" and parts[1:] == ["validate-yaml"]:
                return self._validate_yaml
            if parts[1:2] == ["models"] and len(parts) >= 4:
                repo_id, rest = "/".join(parts[2:4]), parts[4:]
                action = (method, rest[0] if rest else "info")
                handlers = {
                    ("GET", "info"): self._info,
                    ("GET", "revision"): self._info,
                    ("GET", "tree"): self._tree,
                    ("POST", "preupload"): self._preupload,
                    ("POST", "commit"): self._commit,
                    ("POST", "branch"): self._branch,
                }
                if action in handlers:
                    return lambda body: handlers[action](repo_id, rest[1:], body)
        elif method in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve":
            return lambda body: self._resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]), method)
        return None

    # --- write routes -------------------------------------------------------------------------------
    def _create_repo(self, body: bytes) -> None:
        payload = json.loads(body)
        if payload.get("type", "model") != "model":
            raise HubError(400, None, "this test server only hosts model repos")
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        url = f"{self.server.endpoint}/{repo_id}"
        self.server.store.create(repo_id, payload.get("visibility") == "private", url)
        self._json({"url": url, "name": repo_id})

    def _validate_yaml(self, body: bytes) -> None:
        content = json.loads(body)["content"]
        if content.startswith("---"):
            try:
                meta = yaml.safe_load(content.split("---", 2)[1])
            except yaml.YAMLError as err:
                raise HubError(400, None, f"invalid YAML: {err}") from err
            if meta is not None and not isinstance(meta, dict):
                raise HubError(400, None, "YAML metadata must be a mapping")
        self._json({"errors": [], "warnings": []})

    def _preupload(self, repo_id: str, rest: list[str], body: bytes) -> None:
        files = self.server.store.files(repo_id, self.server.store.resolve(repo_id, rest[0]))
        answer = []
        for entry in json.loads(body)["files"]:
            # "regular" makes the client send the bytes base64-encoded inside the commit: no LFS/xet upload.
            # `oid` of an existing file lets the client skip files that did not change, as on the Hub.
            oid = git_blob_sha(files[entry["path"]].read_bytes()) if entry["path"] in files else None
            answer.append({"path": entry["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": oid})
        self._json({"files": answer})

    def _commit(self, repo_id: str, rest: list[str], body: bytes) -> None:
        if "create_pr" in self.query:
            raise HubError(400, None, "pull requests are not supported by this test server")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header, files, deleted = lines[0]["value"], {}, []
        for line in lines[1:]:
            if line["key"] == "file":
                files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
            elif line["key"] == "deletedFile":
                deleted.append(line["value"]["path"])
            else:
                raise HubError(400, None, f"commit entry {line['key']!r} (LFS/folder) is not supported here")
        sha = self.server.store.commit(repo_id, rest[0], files, deleted, header["summary"])
        url = f"{self.server.endpoint}/{repo_id}/commit/{sha}"
        self._json({"commitUrl": url, "commitOid": sha, "pullRequestUrl": None})

    def _branch(self, repo_id: str, rest: list[str], body: bytes) -> None:
        start = (json.loads(body) if body else {}).get("startingPoint", "main")
        self.server.store.branch(repo_id, rest[0], start)
        self._json({})

    # --- read routes --------------------------------------------------------------------------------
    def _info(self, repo_id: str, rest: list[str], body: bytes) -> None:
        store = self.server.store
        sha = store.resolve(repo_id, rest[0] if rest else "main")
        private = json.loads((store.repo(repo_id) / "private").read_text())
        siblings = [{"rfilename": path} for path in store.files(repo_id, sha)]
        self._json({"id": repo_id, "sha": sha, "siblings": siblings, "private": private, "tags": []})

    def _tree(self, repo_id: str, rest: list[str], body: bytes) -> None:
        files = self.server.store.files(repo_id, self.server.store.resolve(repo_id, rest[0]))
        prefix = "/".join(rest[1:]).strip("/")
        prefix = prefix + "/" if prefix else ""
        recursive = self.query.get("recursive", ["False"])[0].lower() == "true"
        entries, folders = [], set()
        for path, file in files.items():
            if not path.startswith(prefix):
                continue
            sub = path[len(prefix) :]
            if "/" in sub and not recursive:
                folders.add(prefix + sub.split("/")[0])
                continue
            data = file.read_bytes()
            entries.append({"type": "file", "path": path, "size": len(data), "oid": git_blob_sha(data)})
        entries += [{"type": "directory", "path": f, "oid": "0" * 40} for f in sorted(folders)]
        self._json(entries)

    def _resolve(self, repo_id: str, revision: str, path: str, method: str) -> None:
        sha = self.server.store.resolve(repo_id, revision)
        files = self.server.store.files(repo_id, sha)
        if path not in files:
            raise HubError(404, "EntryNotFound", f"{path} does not exist on {revision}", commit=sha)
        data = files[path].read_bytes()
        headers = {"X-Repo-Commit": sha, "ETag": f'"{git_blob_sha(data)}"'}
        self._send(200, data, headers, body=method == "GET")

    def _json(self, obj) -> None:
        self._send(200, json.dumps(obj).encode(), {"Content-Type": "application/json"})

    def _send(self, status: int, data: bytes, headers: dict[str, str], body: bool = True) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))  # also on HEAD: the client reads the size from it
        self.end_headers()
        if body:
            self.wfile.write(data)


class HubServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path):
        super().__init__(("127.0.0.1", 0), HubHandler)  # port 0: the OS picks a free one
        self.store = RepoStore(root)
        self.endpoint = f"http://127.0.0.1:{self.server_address[1]}"
        self.unhandled: list[str] = []  # requests no route answered, and server errors
        self.log: list[str] = []  # every request, "METHOD /path"


@pytest.fixture
def hub_server(tmp_path, monkeypatch):
    """Start a local Hub, point `huggingface_hub` and `transformers` at it, and yield the server.

    `huggingface_hub.constants` reads the environment once, at import, so the module attributes the
    client reads at call time are patched as well as the environment variables.
    """
    from huggingface_hub import constants, hf_api
    from transformers.utils import hub as transformers_hub

    server = HubServer(tmp_path / "hub-server")
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    endpoint, home = server.endpoint, tmp_path / "hf-home"
    env = {
        "HF_ENDPOINT": endpoint,
        "HF_TOKEN": "hf_dummy_test_token",
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_OFFLINE": "0",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    patched = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": constants.HF_URL_HOSTS | {"127.0.0.1"},
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_XET": True,
    }
    for name, value in patched.items():
        monkeypatch.setattr(constants, name, value)
    # The module-level `HfApi()` behind `huggingface_hub.model_info` & co. captured the endpoint at import;
    # transformers keeps its own lazily created HfApi.
    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)
    monkeypatch.setattr(transformers_hub, "_hf_api", None)
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)
    shutil.rmtree(tmp_path / "hub-server", ignore_errors=True)


@pytest.fixture
def hub_endpoint(hub_server) -> str:
    """URL of a running local Hub that `huggingface_hub` and `transformers` talk to for this test."""
    return hub_server.endpoint
