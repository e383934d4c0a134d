"""A stand-in for the Hugging Face Hub's file endpoint, on 127.0.0.1 only, for the download tests.

It answers `HEAD`/`GET {endpoint}/{owner}/{repo}/resolve/{revision}/{filename}` the way huggingface_hub 2.x expects
(see `get_hf_file_metadata` and `hf_raise_for_status` in huggingface_hub):

- every answer about a known repository carries `X-Repo-Commit` (the commit the revision points to); a revision
  may be a branch or the hash of any commit made, as on the Hub;
- an LFS file answers with a 302 to a "CDN" on another origin (a second server on another port), with
  `X-Linked-Etag` (its sha256) and `X-Linked-Size`; the client does not follow that redirect for HEAD and then GETs
  the CDN URL directly, as it does with the real Hub;
- a regular (non-LFS) file answers 200 with `ETag` and `Content-Length`, and GET serves it from the Hub itself;
- errors are 4xx with `X-Error-Code` (`RepoNotFound`, `RevisionNotFound`, `EntryNotFound`), which is what the client
  turns into its typed exceptions;
- never an `X-Xet-Hash` header or a `xet-auth` link: either would send the client to the Xet storage protocol (the
  hf_xet extension), which nothing here speaks.

Uploads (`refsr push`, through `HfApi.create_repo` and `create_commit`) are answered as the Hub answers them:

- `POST /api/repos/create`: 409 if the repository exists (the client's `exist_ok` accepts that), else an empty `main`;
- `POST /api/validate-yaml`: no errors (the client checks a README's metadata before committing it);
- `POST /api/models/{owner}/{repo}/branch/{name}`: a new branch at main's head, 409 if it exists;
- `POST /api/models/{owner}/{repo}/preupload/{revision}`: every file "regular", so its bytes travel base64 in the
  commit itself (the Hub's choice to make; LFS would send the client to the Xet protocol);
- `POST /api/models/{owner}/{repo}/commit/{revision}`: the NDJSON commit, published as the new head of the revision,
  so a pushed file downloads back through the endpoints above.

Every write needs an `Authorization: Bearer` header (401 without one, as for an anonymous user). Every request is
recorded in `requests`, so a test can prove that a cache hit downloaded nothing.

Opt-in misbehaviour, for the tests of what refsr says then (each off by default):

- `refusals`: {repo id: (status, headers)} answered to every file request of that repository (a gated repository:
  403 with `X-Error-Code: GatedRepo`; a disabled one: 403 with the message the Hub sends);
- `repo_commit`: an `X-Repo-Commit` value sent instead of the real commit (a server that is not the Hub);
- `commit_url_tail`: text added to the commit URL of every commit's answer;
- `dropped_headers`: header names left out of every answer (`ETag`, `X-Repo-Commit`: a plain web server);
- `linked_etag`: an `X-Linked-Etag` value sent for every LFS file instead of its sha256 (one that climbs out of
  the cache's blobs/ has huggingface_hub link the snapshot to whatever file it names);
- `ignored`: paths the preupload answer marks `shouldIgnore` (as the repository's .gitignore would);
- `not_json`: upload actions ("create", "preupload", "commit") answered 200 with an HTML page instead of JSON;
- `card_errors`: the messages validate-yaml answers with a 400 (the Hub refusing a model card's metadata).
"""
import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


def git_sha1(data: bytes) -> str:
    """What `git hash-object` gives: the name of a git blob."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.0: one request per connection, so no pooled connection outlives a stopped server.
    protocol_version = "HTTP/1.0"
    # A socket timeout for each connection: a stuck client cannot hold a handler thread for long.
    timeout = 5

    def do_HEAD(self):
        self._answer(send_body=False)

    def do_GET(self):
        self._answer(send_body=True)

    def do_POST(self):
        hub = self.server.hub
        path = urlsplit(self.path).path
        hub._record(self.server.role, "POST", path)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        authorised = self.headers.get("Authorization", "").startswith("Bearer ")
        status, answer = hub._write_answer(path, body, authorised)
        data = json.dumps(answer).encode()
        if status == 200 and hub._action(path) in hub.not_json:
            data = b"<html>"
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        if status >= 400:
            self.send_header("X-Error-Message", answer.get("error", ""))
            if "code" in answer:
                self.send_header("X-Error-Code", answer["code"])
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):  # quiet: pytest shows failures, not an access log
        pass

    def _answer(self, send_body):
        hub = self.server.hub
        path = urlsplit(self.path).path
        hub._record(self.server.role, self.command, path)
        if self.server.role == "cdn":
            status, headers, body = hub._cdn_answer(path)
        else:
            status, headers, body = hub._hub_answer(path)
        self.send_response(status)
        for name, value in headers.items():
            if name not in hub.dropped_headers:
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            if hub.cut_downloads and self.server.role == "cdn":
                # A connection that drops mid-transfer: half the promised bytes, then the handler closes it.
                body = body[:len(body) // 2]
            self.wfile.write(body)


class FakeHub:
    """Two loopback servers: `url` is the Hub endpoint (for HF_ENDPOINT), `cdn_url` where LFS files really live."""

    def __init__(self):
        self.repos = {}  # repo id -> {revision: (commit hash, {filename: (bytes, is_lfs)})}
        self.commits = {}  # (repo id, commit hash) -> (commit hash, {filename: (bytes, is_lfs)}): every commit made
        self.blobs = {}  # sha256 -> bytes, served by the CDN
        self.requests = []  # (role, method, path) of every request, in order
        self.cut_downloads = False  # when True, the CDN drops every download halfway
        self.refusals = {}  # repo id -> (status, headers) of every answer about its files
        self.repo_commit = None  # when set, the X-Repo-Commit of every answer about a file
        self.commit_url_tail = ""  # text added to the commit URL a commit answers with (a server's control characters)
        self.dropped_headers = set()  # header names left out of every answer (a server that is not the Hub)
        self.linked_etag = None  # when set, the X-Linked-Etag of every answer about an LFS file (a server's lie)
        self.ignored = set()  # paths the preupload answer marks shouldIgnore
        self.not_json = set()  # upload actions answered with a page that is not JSON
        self.card_errors = []  # validate-yaml's errors: a README's metadata the Hub refuses
        self._lock = threading.Lock()
        self._servers = []

    # --- content ---

    def add_revision(self, repo, revision, files, lfs=True):
        """Publish `files` ({filename: bytes}) as `revision` of `repo`, at a commit hash derived from the content."""
        digest = hashlib.sha1(repo.encode() + revision.encode())
        for name in sorted(files):
            digest.update(name.encode() + files[name])
        commit = digest.hexdigest()
        self.repos.setdefault(repo, {})[revision] = (commit, {name: (data, lfs) for name, data in files.items()})
        self.commits[repo, commit] = self.repos[repo][revision]  # reachable by its hash after the revision moves on
        if lfs:
            for data in files.values():
                self.blobs[hashlib.sha256(data).hexdigest()] = data
        return commit

    def files(self, repo, revision="main"):
        """{filename: bytes} at the head of a revision."""
        return {name: data for name, (data, _) in self.repos[repo][revision][1].items()}

    def commit(self, repo, revision):
        return self.repos[repo][revision][0]

    # --- requests seen ---

    def _record(self, role, method, path):
        with self._lock:
            self.requests.append((role, method, path))

    def count(self, method=None):
        with self._lock:
            return sum(1 for _, m, _ in self.requests if method is None or m == method)

    # --- answers ---

    def _hub_answer(self, path):
        parts = path.lstrip("/").split("/", 4)
        if len(parts) != 5 or parts[2] != "resolve":
            return 404, {}, b"Not Found"
        repo, revision, filename = f"{parts[0]}/{parts[1]}", unquote(parts[3]), unquote(parts[4])
        if repo in self.refusals:
            status, headers = self.refusals[repo]
            return status, headers, b"Forbidden"
        if repo not in self.repos:
            # The real Hub answers 401 (not 404) to an anonymous request for a missing or private repository.
            return 401, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}, b"Repository not found"
        known = self.repos[repo].get(revision) or self.commits.get((repo, revision))  # a branch, or a commit's hash
        if known is None:
            return (404, {"X-Error-Code": "RevisionNotFound", "X-Error-Message": f"Invalid rev id: {revision}"},
                    b"Invalid rev id")
        commit, files = known
        commit = self.repo_commit or commit
        if filename not in files:
            return (404, {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found", "X-Repo-Commit": commit},
                    b"Entry not found")
        data, is_lfs = files[filename]
        if is_lfs:
            sha256 = hashlib.sha256(data).hexdigest()
            return 302, {"Location": f"{self.cdn_url}/blobs/{sha256}", "X-Repo-Commit": commit,
                         "X-Linked-Etag": f'"{sha256 if self.linked_etag is None else self.linked_etag}"',
                         "X-Linked-Size": str(len(data)),
                         "ETag": f'"{hashlib.sha1(data).hexdigest()}-pointer"'}, b"Found"
        # A regular file: its ETag is the git blob's sha1, as the Hub's is (the cache names its blob by it).
        return 200, {"X-Repo-Commit": commit, "ETag": f'"{git_sha1(data)}"'}, data

    def _write_answer(self, path, body, authorised):
        """(status, JSON answer) of an upload request."""
        if not authorised:
            return 401, {"error": "Invalid credentials in Authorization header"}
        if path == "/api/validate-yaml":
            if self.card_errors:
                return 400, {"error": "Invalid metadata", "errors": [{"message": m} for m in self.card_errors],
                             "warnings": []}
            return 200, {"errors": [], "warnings": []}
        if path == "/api/repos/create":
            payload = json.loads(body)
            repo = f"{payload['organization']}/{payload['name']}"
            if repo in self.repos:
                return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo}"}
            self.add_revision(repo, "main", {}, lfs=False)
            return 200, {"url": f"{self.url}/{repo}"}
        parts = path.lstrip("/").split("/")
        if len(parts) != 6 or parts[0] != "api" or parts[1] != "models" or parts[4] not in ("preupload", "commit",
                                                                                             "branch"):
            return 404, {"error": "Not Found"}
        repo, action, revision = f"{parts[2]}/{parts[3]}", parts[4], unquote(parts[5])
        if repo not in self.repos:
            return 404, {"error": "Repository not found", "code": "RepoNotFound"}
        if action == "branch":  # a new branch starts at main's head
            if revision in self.repos[repo]:
                return 409, {"error": "Reference already exists"}
            self.add_revision(repo, revision, self.files(repo, "main"), lfs=False)
            return 200, {}
        if revision not in self.repos[repo]:
            return 404, {"error": f"Invalid rev id: {revision}", "code": "RevisionNotFound"}
        if action == "preupload":
            return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "oid": None,
                                    "shouldIgnore": f["path"] in self.ignored} for f in json.loads(body)["files"]]}
        files = self.files(repo, revision)
        for line in body.splitlines():
            item = json.loads(line)
            if item["key"] == "file":
                files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            elif item["key"] != "header":
                return 400, {"error": f"this fake Hub takes regular files only, not {item['key']}"}
        commit = self.add_revision(repo, revision, files, lfs=False)
        return 200, {"commitUrl": f"{self.url}/{repo}/commit/{commit}{self.commit_url_tail}", "commitOid": commit}

    @staticmethod
    def _action(path):
        """"create", "preupload", "commit" or "branch" for an upload request's path, else None."""
        if path == "/api/repos/create":
            return "create"
        parts = path.lstrip("/").split("/")
        return parts[4] if len(parts) == 6 and parts[:2] == ["api", "models"] else None

    def _cdn_answer(self, path):
        sha256 = path.rsplit("/", 1)[-1]
        if not path.startswith("/blobs/") or sha256 not in self.blobs:
            return 404, {}, b"NoSuchKey"
        return 200, {"ETag": f'"{sha256}"'}, self.blobs[sha256]

    # --- lifetime ---

    def start(self):
        for role in ("hub", "cdn"):
            server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)  # port 0: a free port, on loopback only
            server.hub, server.role = self, role
            server.daemon_threads = True
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                      name=f"fake-{role}", daemon=True)
            thread.start()
            self._servers.append((server, thread))
        self.url, self.cdn_url = (f"http://127.0.0.1:{s.server_address[1]}" for s, _ in self._servers)
        return self

    def stop(self):
        """Stop both servers and close their ports: later connections are refused. Safe to call twice."""
        while self._servers:
            server, thread = self._servers.pop()
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
