"""Everything Hugging Face Hub: downloads of `--weights owner/repo[@revision][:filename]` into the Hub's cache
(failing fast, in one line, when the Hub cannot be reached), and `refsr push`: checkpoints to a model repository,
with a model card, in one commit.

Each checkpoint goes up under the name `--weights owner/repo` looks for (refsr-x{scale}.safetensors), so what was
pushed loads back with `refsr upscale photo.png --weights owner/repo --scale S`. huggingface_hub is imported only
when a Hub reference is used: `refsr upscale` of a local file never pays for it.
"""
import errno
import hashlib
import importlib
import json
import os
import re
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import NamedTuple

from .checkpoint import default_filename, expanded, load_weights, texture_trained
from .errors import RefsrError
from .files import git_sha1_of, sha256_of
from .report import warning_line

HUB_REF = re.compile(r"^(?P<repo>[\w.-]+/[\w.-]+?)(?:@(?P<revision>[\w./-]+?))?(?::(?P<filename>[\w./-]+))?$")


def http_client_errors() -> tuple:
    """The base error class of the HTTP client under huggingface_hub, which is not an OSError: httpx2 for
    huggingface_hub 2.x, httpx for 1.x (0.x used requests, whose errors are OSErrors). A connection dropped in the
    middle of a download ends with one of these."""
    errors = []
    for name in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(name).HTTPError)
        except ImportError:
            pass
    return tuple(errors)


COMMIT_HASH = re.compile(r"[0-9a-f]{40}")  # a git commit's name, as the Hub gives it
BLOB_NAME = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")  # a cache blob's: a regular file's git sha1, an LFS file's sha256
HUB_TIMEOUT = 5  # seconds the Hub has to answer where a file is (huggingface_hub's own: 10, then retries)
FAILS_FAST = threading.Lock()  # one hub_fails_fast at a time: two threads' saves and restores interleaved, and
# left the bounds in place for the rest of the process


@contextmanager
def hub_fails_fast():
    """hf_hub_download without its retries of a Hub that cannot be reached. When its request for a file's metadata
    fails on the network (or with a 5xx) and the file is not cached, huggingface_hub 2.x asks again with a 60 s
    timeout (file_download._ETAG_RETRY_TIMEOUT) and 5 retries backed off 1+2+4+8+8 s (utils/_http.py, http_backoff):
    26 s before an error when the connection is refused, minutes when nobody answers. A command line is better
    served by an error within HUB_TIMEOUT that says how to use the cache; a cached file is still returned (that
    fallback never retried). These module globals of file_download are set for the duration of refsr's call only
    (one thread's download at a time), and only those this version has: another keeps its own behaviour."""
    from huggingface_hub import file_download
    bounds = {"_DEFAULT_RETRY_ON_EXCEPTIONS": (), "_DEFAULT_RETRY_ON_STATUS_CODES": (),
              "_ETAG_RETRY_TIMEOUT": HUB_TIMEOUT}
    with FAILS_FAST:
        saved = {name: getattr(file_download, name) for name in bounds if hasattr(file_download, name)}
        try:
            for name in saved:
                setattr(file_download, name, bounds[name])
            yield
        finally:
            for name, value in saved.items():
                setattr(file_download, name, value)


def import_hub():
    """huggingface_hub's constants, imported. It reads its HF_* environment variables on import, and a malformed one
    (HF_ENDPOINT=http://[::1, HF_HUB_ETAG_TIMEOUT=abc) raises a ValueError there: a RefsrError instead."""
    try:
        from huggingface_hub import constants
        from huggingface_hub.utils import logging as hub_logging
        for module in ("file_download", "hf_api"):  # which parse HF_ENDPOINT (a port past 65535) on import
            importlib.import_module(f"huggingface_hub.{module}")
    except ValueError as e:
        raise RefsrError(f"huggingface_hub cannot start: {e} (check the HF_* environment variables)") from None
    # Its log, errors too ("Trying to resume download...", five times, then "Max retries exceeded"; "Could not cache
    # non-existence of file. Will ignore error and continue"), is not refsr's one line: what failed is said there.
    hub_logging.set_verbosity(hub_logging.CRITICAL + 1)
    return constants


def hub_token() -> str | None:
    """The token huggingface_hub will send: HF_TOKEN, else the one `hf auth login` stored (at HF_TOKEN_PATH). One
    it cannot read, or that is no token, is a RefsrError saying which (huggingface_hub's own error blamed the HF_*
    settings, or was a traceback)."""
    from huggingface_hub import get_token
    try:
        token = get_token()
    except (OSError, ValueError) as e:  # a folder at HF_TOKEN_PATH, a file that is not text (UnicodeDecodeError)
        raise RefsrError(f"cannot read the Hub token file ({(str(e).splitlines() or [type(e).__name__])[0]}); "
                         "HF_TOKEN_PATH names it") from None
    if token is not None and not (token.isascii() and token.isprintable()):  # it goes into an HTTP header
        raise RefsrError("the Hub token (HF_TOKEN, or the one `hf auth login` stored) holds characters no token "
                         "has (control characters, or not ASCII); set it again")
    return token


def download_from_hub(repo: str, filename: str, revision: str | None) -> Path:
    """The file from the Hugging Face cache, downloaded there if needed; an error within seconds when the Hub
    cannot be reached and the file is not cached (HUB_TIMEOUT; HF_HUB_ETAG_TIMEOUT, when set, takes precedence).
    A cached copy whose bytes are not the ones the Hub named is refused (check_cache_copy)."""
    constants = import_hub()
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    where = f"{repo}{'@' + revision if revision else ''}:{filename}"
    # A folder, not a file of it (as written: PurePosixPath reads "FILE/." as FILE, which huggingface_hub then made
    # a folder in the cache, in the way of FILE's every later download).
    if filename.rsplit("/", 1)[-1] in ("", ".", ".."):
        raise RefsrError(f"{where}: {filename!r} is not a file name in the repository")
    # Refused here, not by huggingface_hub: its ValueError would read like one about an answer of the server's.
    if filename.startswith("/") or ".." in filename.split("/"):
        raise RefsrError(f"{where}: not a valid Hub reference ({filename!r} climbs out of the repository)")
    if revision is not None and not git_ref_name(revision):  # `@..` asked for a URL that had collapsed
        raise RefsrError(f"{where}: {revision!r} is not a revision name (a branch, a tag or a commit's hash)")
    try:  # as huggingface_hub will, with a RuntimeError of its own for a user without a home
        expanded(constants.HF_HUB_CACHE)
    except RefsrError as e:
        raise RefsrError(f"{where}: cannot use the Hugging Face cache ({e}); HF_HOME or HF_HUB_CACHE choose another "
                         "folder") from None
    pinned = COMMIT_HASH.fullmatch(revision or "") is not None
    ref_name = None if pinned else revision or "main"  # the cache's refs/ file of the revision (a commit has none)
    try:
        with hub_fails_fast(), answers_seen() as answers, warnings.catch_warnings(record=True) as said, \
                ref_kept_on_failure(repo, filename, ref_name):
            warnings.simplefilter("always")
            try:
                path = Path(hf_hub_download(repo_id=repo, filename=filename, revision=revision,
                                            etag_timeout=HUB_TIMEOUT))
            finally:  # huggingface_hub's warnings (too little free disk), each as refsr's one line
                for warning in said:
                    warning_line(f"{where}: {warning.message}")
    except (OSError, EntryNotFoundError, ValueError, OverflowError, KeyError, AttributeError, TypeError,
            *http_client_errors()) as e:
        hint = cached_elsewhere(repo, filename, ref_name) if isinstance(e, LocalEntryNotFoundError) else ""
        raise RefsrError(f"{where}: {download_trouble(e, constants)}{hint}") from None
    commit = path.parents[len(PurePosixPath(filename).parts) - 1].name  # the snapshot's: what the record pins
    if pinned and commit != revision:
        raise RefsrError(f"{where}: the server answered with commit {commit[:40]} for commit {revision}: it is not "
                         "answering as the Hub does (is HF_ENDPOINT a Hugging Face Hub?)")
    # A commit's hash that is cached is returned without asking the Hub (any other revision, it asks: no answer
    # then is a Hub that did not give one, not to be asked again).
    if not answers and not constants.HF_HUB_OFFLINE and pinned:
        answers = asked_etag(repo, filename, revision)
    etag = getattr(answers[-1], "etag", None) if answers else None
    check_cache_copy(path, filename, where, etag if isinstance(etag, str) else None)
    return path


def cached_repository(repo: str) -> Path:
    """The Hugging Face cache's folder of `repo` (models--owner--name: its refs/, snapshots/ and blobs/)."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name
    return Path(expanded(constants.HF_HUB_CACHE)) / repo_folder_name(repo_id=repo, repo_type="model")


def commit_named(ref: Path) -> str | None:
    """The commit a cache's refs/NAME file names, or None (none there, or not readable)."""
    try:
        return ref.read_text().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


@contextmanager
def ref_kept_on_failure(repo: str, filename: str, ref_name: str | None):
    """huggingface_hub moves the cache's refs/REF_NAME to the commit the Hub names before it downloads that commit's
    file: a download cut then (Ctrl-C, a dropped connection) left the file cached for the commit before out of reach
    (offline, or with the Hub down: "not in the local cache", where HF_HUB_OFFLINE=1 was the advice). So when the
    download fails, the ref is set back, if the commit it names now has no copy of the file and the one before has
    (one that another process has since downloaded whole is left as it is). `ref_name` None: a pinned commit."""
    if ref_name is None:
        yield
        return
    storage = cached_repository(repo)
    ref = storage / "refs" / ref_name
    before = commit_named(ref)
    try:
        yield
    except BaseException:
        now = commit_named(ref)
        if (before and now and now != before and COMMIT_HASH.fullmatch(before)
                and not (storage / "snapshots" / now / filename).exists()
                and (storage / "snapshots" / before / filename).exists()):
            temporary = ref.with_name(f".{ref.name}.refsr-{os.getpid()}.tmp")
            try:
                temporary.write_text(before)
                os.replace(temporary, ref)
            except OSError:  # (a cache that cannot be written: the download's own error says more)
                temporary.unlink(missing_ok=True)
        raise


def cached_elsewhere(repo: str, filename: str, ref_name: str | None) -> str:
    """For a file "not in the local cache" whose ref the cache names a commit without a copy of it (a download
    killed outright, SIGKILL or the OOM killer, where ref_kept_on_failure cannot run): the commits the cache does
    hold a copy for, and how to pin one. Which of them the ref named before is not recorded anywhere."""
    if ref_name is None:
        return ""
    try:
        storage = cached_repository(repo)
        named = commit_named(storage / "refs" / ref_name)
        held = sorted(((folder / filename).stat().st_mtime, folder.name) for folder in (storage / "snapshots").iterdir()
                      if COMMIT_HASH.fullmatch(folder.name) and (folder / filename).is_file())  # (a link to a blob)
        refs = {commit_named(path): path.relative_to(storage / "refs").as_posix()
                for path in (storage / "refs").rglob("*") if path.is_file()}
    except (OSError, RefsrError):
        return ""
    if named is None or not held or any(commit == named for _, commit in held):
        return ""
    shown = ", ".join(commit + (f" ({refs[commit]})" if commit in refs else "") for _, commit in reversed(held))
    return (f"; {ref_name} names commit {named[:12]}, whose copy never came, and the cache holds copies for commit "
            f"{shown}: --weights {repo}@COMMIT:{filename} pins one")


def asked_etag(repo: str, filename: str, revision: str | None) -> list:
    """[the file's metadata] as the Hub gives it now, or [] when it cannot be had (the Hub unreachable, a server
    that answers otherwise): what check_cache_copy compares a pinned copy with, as hf_hub_download asks it for any
    other revision (a redo's pinned owner/repo@COMMIT:FILE was used as the cache held it)."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    try:
        with hub_fails_fast():
            return [get_hf_file_metadata(hf_hub_url(repo, filename, revision=revision), timeout=HUB_TIMEOUT)]
    except Exception:  # (any failure: the cached copy is then checked by its blob's name alone, as offline)
        return []


@contextmanager
def answers_seen():
    """The file metadata (etag, commit) hf_hub_download gets from the Hub, as it gets them: the cache's copy it
    returns is compared with them (check_cache_copy), without a request of refsr's own. Empty offline, when the Hub
    cannot be reached, or in a huggingface_hub that asks otherwise. Under hub_fails_fast's lock: one thread's."""
    from huggingface_hub import file_download
    real, seen = getattr(file_download, "get_hf_file_metadata", None), []
    if real is None:
        yield seen
        return

    caller = threading.get_ident()

    def recording(*args, **kwargs):
        metadata = real(*args, **kwargs)
        if threading.get_ident() == caller:  # (a host's own download in another thread is not this file's)
            seen.append(metadata)
        return metadata

    file_download.get_hf_file_metadata = recording
    try:
        yield seen
    finally:
        file_download.get_hf_file_metadata = real


def check_cache_copy(path: Path, filename: str, where: str, etag: str | None) -> None:
    """Refuse a cached copy that is not the file the Hub named. huggingface_hub links a snapshot's file to
    blobs/NAME, NAME being the hash the Hub's answer gave (an LFS file's sha256, from X-Linked-Etag; a regular
    file's git sha1, from its ETag), and compares nothing: a blob changed on disk, a link or a snapshot folder
    pointed at another file or commit, or an etag that climbs out of blobs/ (huggingface_hub then links to the file
    it names) were loaded as the commit's weights, and recorded so. So: the snapshot's folders are folders, its
    file links to one of the repository's blobs, named by a hash its bytes have, and, when the Hub answered (`etag`,
    as hf_hub_download got it), by that very hash. Offline, a link to another commit's intact blob cannot be told.
    Where the file system has no symbolic links, huggingface_hub keeps a plain copy in the snapshot and no hash
    beside it: it is compared with `etag`, when the Hub answered. A FIFO or a device at the blob is left to
    resolve_weights, which refuses it (reading it would hang)."""
    depth = len(PurePosixPath(filename).parts)
    repository = path.parents[depth + 1]  # models--owner--repo/snapshots/COMMIT/FILE
    known = etag if etag is not None and BLOB_NAME.fullmatch(etag) else None
    linked = [folder for folder in path.parents[:depth] if os.path.islink(folder)]
    if linked:  # (a snapshot folder linked to another commit's)
        raise RefsrError(f"{where}: the Hugging Face cache's folder {linked[-1]} is a link, where huggingface_hub "
                         "makes a folder; remove it and download again")
    if not os.path.islink(path):
        if known and path.is_file() and (hashed := hub_hash(path, known))[1] != known:
            raise RefsrError(f"{where}: the Hugging Face cache's copy {path} is damaged (its bytes are not the "
                             f"{hashed[0]} the Hub gives for it); remove it and download again")
        return
    blob = Path(os.path.realpath(path))
    if blob.parent != Path(os.path.realpath(repository / "blobs")) or not BLOB_NAME.fullmatch(blob.name):
        raise RefsrError(f"{where}: the Hugging Face cache's copy {path} links to {blob}, not to one of the cache's "
                         "blobs; remove it and download again (named so again, the server is not answering as the "
                         "Hub does)")
    if known and blob.name != known:
        raise RefsrError(f"{where}: the Hugging Face cache's copy {path} links to {blob.name}, and the Hub names this "
                         f"commit's file {known}; remove it and download again")
    if blob.is_file() and (hashed := hub_hash(blob, blob.name))[1] != blob.name:
        raise RefsrError(f"{where}: the Hugging Face cache's copy {blob} is damaged (its bytes are not the "
                         f"{hashed[0]} the Hub named them by); remove it and download again")


def hub_hash(path: Path, etag: str) -> tuple:
    """(which hash, the file's) of the kind the Hub names a file by in `etag`: an LFS file's sha256 (64 hex
    digits), another's git blob sha1 (40)."""
    return ("sha256", sha256_of(path)) if len(etag) == 64 else ("git sha1", git_sha1_of(path))


def download_trouble(e: Exception, constants) -> str:
    """What a failed hf_hub_download says, after the reference."""
    from huggingface_hub.errors import (EntryNotFoundError, FileMetadataError, GatedRepoError, HfHubHTTPError,
                                        LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)
    if isinstance(e, RevisionNotFoundError):
        return "no such revision on the Hub"
    if isinstance(e, LocalEntryNotFoundError):  # before EntryNotFoundError, its base: "not cached", not "not there"
        if constants.HF_HUB_OFFLINE:
            return ("offline mode (HF_HUB_OFFLINE=1) is on and the file is not in the local cache; download it once "
                    "online first")
        if isinstance(e.__cause__, HfHubHTTPError) and (refusal := hub_refusal(e.__cause__, True)):  # it said no
            return refusal
        if isinstance(e.__cause__, FileMetadataError):  # it answered, without an ETag or an X-Repo-Commit
            return hub_trouble(e.__cause__)
        # The cause, when huggingface_hub kept it: "[Errno 111] Connection refused", "timed out", an HTTP status.
        cause = (str(e.__cause__).strip().splitlines() or [type(e.__cause__).__name__])[0] if e.__cause__ else ""
        if "Timeout" in type(e.__cause__).__name__:  # ConnectTimeout, ReadTimeout: a slow network may need longer
            cause += f"; HF_HUB_ETAG_TIMEOUT=SECONDS waits longer than {HUB_TIMEOUT} s"
        return (f"the Hub cannot be reached{f' ({cause})' if cause else ''} and the file is not in the local cache "
                "(once downloaded, it works offline with HF_HUB_OFFLINE=1)")
    if isinstance(e, EntryNotFoundError):
        return "no such file in that Hub repository"
    if isinstance(e, RepositoryNotFoundError) and not isinstance(e, GatedRepoError):  # gated: one of its kind
        return "no such Hub repository (or it is private)"
    if isinstance(e, HfHubHTTPError) and (refusal := hub_refusal(e)):
        return refusal
    if isinstance(e, OSError):
        token = os.path.abspath(os.path.expanduser(constants.HF_TOKEN_PATH))
        # Its token file (HF_TOKEN_PATH) a folder or unreadable, in a folder that is one (else HF_HOME is the trouble)
        if e.filename is not None and os.path.abspath(e.filename) == token and os.path.isdir(os.path.dirname(token)):
            return f"cannot read the Hub token file ({e.strerror}: {e.filename}); HF_TOKEN_PATH names it"
        if e.filename is not None:  # the cache's folder, not the network
            return (f"cannot use the Hugging Face cache ({e.strerror}: {e.filename}); HF_HOME or HF_HUB_CACHE choose "
                    "another folder")
        if e.errno == errno.ENOSPC:  # the cache's disk, not the network: offline mode would not help
            return (f"no space left for the download in the Hugging Face cache ({constants.HF_HUB_CACHE}); free some, "
                    "or HF_HOME or HF_HUB_CACHE choose another folder")
    if isinstance(e, (OSError, *http_client_errors())):
        # The first line only: huggingface_hub's HTTP errors add lines of URL and request details.
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if "Timeout" in type(e).__name__ or "timed out" in reason:  # a server that stopped sending
            reason += "; HF_HUB_DOWNLOAD_TIMEOUT=SECONDS waits longer"
        return f"download failed ({reason}); set HF_HUB_OFFLINE=1 to use the cache only"
    return hub_trouble(e)


def hub_refusal(e: Exception, asked_where: bool = False) -> str | None:
    """What a Hub that refused a request said, or None: a gated or disabled repository, or (`asked_where`, for its
    answer to where a file is) any 4xx. huggingface_hub wraps a refused request of that kind in "cannot find it in
    the local cache", which read as a Hub not reached. A 4xx of the download itself (the CDN's) is a failed one."""
    from huggingface_hub.errors import DisabledRepoError, GatedRepoError
    if isinstance(e, GatedRepoError):
        return ("the repository is gated: accept its terms on its Hub page, then log in with a token that has "
                "access (HF_TOKEN or `hf auth login`)")
    if isinstance(e, DisabledRepoError):
        return "the repository is disabled on the Hub"
    status = getattr(getattr(e, "response", None), "status_code", None)
    if not asked_where or not isinstance(status, int) or not 400 <= status < 500:
        return None
    reason = (str(e).strip().splitlines() or [""])[0]
    hint = "; log in with a token that has access (HF_TOKEN or `hf auth login`)" if status in (401, 403) else ""
    return f"the Hub refused it ({reason or status}){hint}"


def hub_trouble(e: Exception) -> str:
    """What a failure of huggingface_hub that is neither the network's nor an HTTP status says."""
    from huggingface_hub.errors import HFValidationError
    first = (str(e).strip().splitlines() or [""])[0]
    if isinstance(e, UnicodeError):  # the token, when it is the trouble (a token file that is not text), says so
        try:
            hub_token()
        except RefsrError as trouble:
            return str(trouble)
    if isinstance(e, OverflowError):  # HF_HUB_ETAG_TIMEOUT=1e10: past what a socket takes
        return "a timeout too large for the network (check HF_HUB_ETAG_TIMEOUT and HF_HUB_DOWNLOAD_TIMEOUT)"
    if isinstance(e, UnicodeError) or isinstance(e, ValueError) and "timeout" in first.lower():
        # HF_HUB_ETAG_TIMEOUT=-5, a token that is not ASCII
        return f"huggingface_hub refused a setting ({first}); check the HF_* environment variables and HF_TOKEN"
    if isinstance(e, ValueError) and "too large" in first:  # past what its download without hf_xet takes
        return f"the file is too large for huggingface_hub's download ({first})"
    if isinstance(e, HFValidationError):  # the repository id the user typed: owner/re..po
        return f"not a valid Hub reference ({first})"
    if isinstance(e, ValueError) and first.startswith("Invalid metadata in README.md"):  # validate-yaml said no
        said = (str(e).strip().splitlines()[1:] or [""])[0].lstrip("- ")
        return f"the Hub refused the model card's metadata{f' ({said})' if said else ''}; check --license"
    # Any other ValueError is an answer's (a body that is not JSON, an X-Repo-Commit that climbs out of the cache);
    # KeyError, AttributeError, TypeError: JSON that is not the Hub's ({} or a list where it expects an object)
    return (f"the server's answer is not the Hub's ({type(e).__name__}: {first}); is HF_ENDPOINT a Hugging Face "
            "Hub?")


# --- push -----------------------------------------------------------------------------------------------------

PUSH_TIMEOUT = 60  # seconds a push waits for the Hub to answer a request (connecting: HUB_TIMEOUT)


class UploadFailed(RefsrError):
    """The Hub refused the push, or it failed on the way: raised once the first request was sent (the repository or
    the branch may exist by then, without the commit). What is refused before any request is a plain RefsrError."""


@contextmanager
def bounded_requests():
    """huggingface_hub's shared HTTP client waits for an answer without a time limit (its API calls, unlike its
    downloads, pass no timeout), so a push to a Hub that does not answer never ended. For the push, its clients are
    made by the factory in use with timeouts added (through huggingface_hub's public set_client_factory), and that
    factory is put back after. Left alone where this huggingface_hub has no such knob."""
    try:
        from huggingface_hub import set_client_factory
        from huggingface_hub.utils import _http
    except ImportError:  # huggingface_hub before 1.0
        yield
        return
    previous = getattr(_http, "_GLOBAL_CLIENT_FACTORY", None)
    if previous is None:
        yield
        return

    def with_timeouts():
        client = previous()
        client.timeout = type(client.timeout)(PUSH_TIMEOUT, connect=HUB_TIMEOUT)
        return client

    set_client_factory(with_timeouts)
    try:
        yield
    finally:
        set_client_factory(previous)


def model_card(repo: str, checkpoints: list, revision: str | None = None, license: str | None = None) -> str:
    """README.md of the repository: YAML metadata the Hub indexes, then what each file is and how to use it.
    `checkpoints` holds checkpoints_to_push's Checkpoints. No licence is claimed unless given: the
    weights' licence follows from their training data, which only their owner knows."""
    lines = ["---", "library_name: refsr"] + ([f"license: {license}"] if license else []) + ["pipeline_tag: image-to-image",
             "tags:", "- super-resolution", "- refvae", "- safetensors", "---", "",
             f"# {repo.split('/')[1]}", "",
             "Weights for [refsr](https://pypi.org/project/refsr/), reference-based image super-resolution after "
             "RefVAE (Liu et al., *Variational AutoEncoder for Reference based Image Super-Resolution*). Each file "
             "is a safetensors checkpoint whose metadata holds the model config that rebuilds it.", "",
             "| file | scale | what it holds | steps | sha256 |", "| --- | --- | --- | --- | --- |"]
    for c in checkpoints:
        texture = ("fidelity trunk and texture branch" if texture_trained(c.metadata)
                   else "fidelity trunk (texture branch untrained)")
        lines.append(f"| `{c.name}` | x{c.config.scale} | {texture} | {c.metadata.get('step', 'n/a')} | "
                     f"`{c.sha256}` |")
    where = f"{repo}@{revision}" if revision else repo
    lines += ["", "## Use", "", "```sh", "pip install refsr"]
    for c in checkpoints:
        suffix = "" if c.name == default_filename(c.config.scale) else f":{c.name}"
        lines.append(f"refsr upscale photo.png --scale {c.config.scale} --weights {where}{suffix} -o out/")
    lines += ["```", "", "or in Python:", "", "```python", "from refsr_cli.engine import Upscaler",
              f"upscaler = Upscaler.from_weights(\"{where}\", scale={checkpoints[0].config.scale})", "```", "",
              "## Config", ""]
    for c in checkpoints:
        lines += [f"`{c.name}`:", "", "```json", json.dumps(json.loads(c.config.to_json()), indent=1), "```", ""]
    return "\n".join(lines)


def push(files: list, repo: str, revision: str | None = None, private: bool = False, message: str | None = None,
         card: bool = True, license: str | None = None) -> str:
    """Upload refsr checkpoints (and a generated README.md) to `repo` in one commit; creates the repository, and the
    branch `revision`, if needed. Returns the commit's URL. Everything is checked before the first request (a
    RefsrError: nothing was sent); what fails after it is an UploadFailed."""
    check_push_arguments(files, repo, revision, private, message, card, license)
    constants = import_hub()
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import (DisabledRepoError, HfHubHTTPError, RepositoryNotFoundError,
                                        RevisionNotFoundError)
    check_destination(repo, revision)
    if constants.HF_HUB_OFFLINE:  # huggingface_hub would refuse the first request: nothing is sent either way
        raise RefsrError(f"{repo}: offline mode (HF_HUB_OFFLINE=1) is on, and push needs the Hub; unset it")
    hub_token()  # (checked before the first request)
    # A licence id goes into the card's YAML as it is: a newline there would add keys of its own.
    if license is not None and not re.fullmatch(r"[a-z0-9][a-z0-9.+-]{0,63}", license):
        raise RefsrError(f"--license {license!r}: not a Hub licence id (lowercase letters, digits and . + -, as in "
                         "mit or apache-2.0)")
    checkpoints = checkpoints_to_push(files)
    operations = [CommitOperationAdd(path_in_repo=c.name, path_or_fileobj=c.data) for c in checkpoints]
    if card:
        operations.append(CommitOperationAdd(path_in_repo="README.md",
                                             path_or_fileobj=model_card(repo, checkpoints, revision, license).encode()))
    api, names = HfApi(), sorted(c.name for c in checkpoints)
    where = f"{repo}{'@' + revision if revision else ''}"
    try:
        with bounded_requests():
            api.create_repo(repo, private=private, exist_ok=True)
            if revision:
                api.create_branch(repo, branch=revision, exist_ok=True)
            refuse_ignored(api, repo, operations, revision, where)
            info = api.create_commit(repo, operations, revision=revision,
                                     commit_message=message or f"refsr push: {', '.join(names)}")
    except RevisionNotFoundError:
        raise UploadFailed(f"{where}: no such branch on the Hub") from None
    except RepositoryNotFoundError:
        raise UploadFailed(f"{where}: no such repository, or no right to write to it") from None
    except HfHubHTTPError as e:
        status = getattr(e.response, "status_code", None)
        if isinstance(e, DisabledRepoError):
            raise UploadFailed(f"{where}: the repository is disabled on the Hub") from None
        if status in (401, 403):
            raise UploadFailed(f"{where}: the Hub refused the upload ({status}): log in with `hf auth login` or set "
                               "HF_TOKEN to a token with write access") from None
        raise UploadFailed(f"{where}: upload failed ({(str(e).strip().splitlines() or ['HTTP error'])[0]})") from None
    except (OSError, *http_client_errors()) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UploadFailed(f"{where}: upload failed ({reason})") from None
    except (ValueError, OverflowError, KeyError, AttributeError, TypeError) as e:  # after create_repo, maybe
        raise UploadFailed(f"{where}: upload failed: {hub_trouble(e)}") from None
    return info.commit_url


def check_push_arguments(files, repo, revision, private, message, card, license) -> None:
    """The types of push's arguments, refused before anything is sent: a wrong one was a raw TypeError or
    IndexError, or reached the Hub (message=5 created the repository before failing, private="no" made it private;
    a str of files was read as its characters, a folder "/")."""
    def shown(value):  # one line: the repr of a plain value, the type of any other
        return repr(value)[:60] if isinstance(value, (str, bytes, int, float, type(None))) else type(value).__name__

    if not isinstance(files, (list, tuple)):
        raise RefsrError(f"files: {shown(files)} is not a list of checkpoint files")
    if not files:
        raise RefsrError("files: none given, nothing to push")
    for file in files:
        try:
            name = os.fspath(file) if isinstance(file, (str, os.PathLike)) else None
        except TypeError:  # an __fspath__ that gives neither str nor bytes
            name = None
        if not isinstance(name, str) or name == "":
            raise RefsrError(f"files: {shown(file)} is not a file name (a str, or an os.PathLike that gives one)")
    if not isinstance(repo, str):
        raise RefsrError(f"repo: {shown(repo)} is not a Hub repository name (a str, owner/name)")
    for name, value in (("revision", revision), ("message", message), ("license", license)):
        if value is not None and not isinstance(value, str):
            raise RefsrError(f"{name}: {shown(value)} is not a str (or None)")
    for name, value in (("private", private), ("card", card)):
        if not isinstance(value, bool):  # "no" is true, and would have made a private repository
            raise RefsrError(f"{name}: {shown(value)} is not True or False")
    if license is not None and not card:  # it would be dropped without a word
        raise RefsrError("--license goes into the model card, which --no-card leaves out: choose one")


def refuse_ignored(api, repo: str, operations: list, revision: str | None, where: str) -> None:
    """Ask the Hub how each file travels (huggingface_hub's preupload step, which create_commit then skips) and
    refuse the commit when it would ignore one: huggingface_hub leaves a file the repository's .gitignore covers
    out of the commit without a word, and push printed the URL of a commit that lacked it (its card listing it)."""
    api.preupload_lfs_files(repo, additions=operations, revision=revision, free_memory=False)
    ignored = [op.path_in_repo for op in operations if getattr(op, "_should_ignore", False)]
    if ignored:
        raise UploadFailed(f"{where}: the repository's .gitignore covers {', '.join(ignored)}, which the Hub would "
                           "leave out of the commit; nothing was committed (change its .gitignore)")


def check_destination(repo: str, revision: str | None) -> None:
    """Refuse, without a request, a repository name the Hub would refuse and a branch --weights could not name."""
    from huggingface_hub.utils import validate_repo_id
    match = HUB_REF.match(repo)
    if match is None or match["revision"] or match["filename"]:
        raise RefsrError(f"{repo}: not a Hub repository name (owner/name)")
    try:
        validate_repo_id(repo)  # the Hub's own rules (no "..", no ".git" ending...), checked without a request
    except ValueError as e:
        raise RefsrError(f"{repo}: not a Hub repository name ({(str(e).strip().splitlines() or [''])[0]})") from None
    if revision is not None:
        # A branch that `--weights OWNER/REPO@BRANCH` could not name would hold weights nothing loads.
        named = HUB_REF.match(f"{repo}@{revision}")
        # and git's rules for a branch (git check-ref-format --branch), which the Hub enforces after create_repo
        refused_by_git = revision == "HEAD" or revision.startswith("-") or not git_ref_name(revision)
        if named is None or named["revision"] != revision or refused_by_git:
            raise RefsrError(f"--revision {revision!r}: not a branch name --weights {repo}@BRANCH can load "
                             "(letters, digits, _ . / -)")
        if COMMIT_HASH.fullmatch(revision):  # @HASH would name this branch and a commit alike
            raise RefsrError(f"--revision {revision}: a branch named like a commit's hash; name it otherwise")


def git_ref_name(revision: str) -> bool:
    """Whether git could name a branch or tag so (git check-ref-format): no "..", no empty part or one that starts
    with ".", no ".lock" or "." at the end."""
    parts = revision.split("/")
    return not (".." in revision or revision.endswith((".lock", ".")) or any(p.startswith(".") or not p
                                                                             for p in parts))


class Checkpoint(NamedTuple):
    """A file to push, as checked: its name in the repository, and the bytes that are sent."""
    name: str
    config: object
    metadata: dict
    data: bytes
    sha256: str


def checkpoints_to_push(files: list) -> list:
    """The Checkpoint of each file, refused unless it loads as a refsr
    checkpoint (a config, weights that fit it, all finite) and is the only one of its scale. The bytes checked are
    the bytes sent: a file replaced after its check (a train saving there) is never uploaded in its place."""
    checkpoints, names = [], {}
    for path in map(Path, files):
        if path.is_dir():
            raise RefsrError(f"{path}: is a folder, not a checkpoint")
        if not path.is_file():
            raise RefsrError(f"{path}: {'not a regular file (a FIFO or device)' if path.exists() else 'no such file'}")
        weights = load_weights(path)
        config = weights.model.config
        name = default_filename(config.scale)
        if name in names and os.path.samefile(names[name], path):  # (through a link, or a hard link)
            raise RefsrError(f"{path} and {names[name]} are one file, named twice; name it once")
        if name in names:
            raise RefsrError(f"{path} and {names[name]} are both x{config.scale} checkpoints; push one per scale")
        names[name] = path
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != weights.sha256:
            raise RefsrError(f"{path}: changed while it was checked (another process saving it?); push again")
        checkpoints.append(Checkpoint(name, config, weights.metadata, data, weights.sha256))
    return checkpoints
