"""`refsr push`: checkpoints to a Hugging Face Hub model repository, with a model card, in one commit.

Each checkpoint goes up under the name `--weights owner/repo` looks for (refsr-x{scale}.safetensors), so what was
pushed loads back with `refsr upscale photo.png --weights owner/repo --scale S`. Downloads are in checkpoint.py.
"""
import json
from contextlib import contextmanager
from pathlib import Path

from .checkpoint import (HUB_REF, HUB_TIMEOUT, check_finite, default_filename, http_client_errors, import_hub,
                         read_config, read_metadata, read_weights)
from .errors import RefsrError
from .files import sha256_of

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
    `checkpoints` holds (path, name in the repository, config, metadata). No licence is claimed unless given: the
    weights' licence follows from their training data, which only their owner knows."""
    lines = ["---", "library_name: refsr"] + ([f"license: {license}"] if license else []) + ["pipeline_tag: image-to-image",
             "tags:", "- super-resolution", "- refvae", "- safetensors", "---", "",
             f"# {repo.split('/')[1]}", "",
             "Weights for [refsr](https://pypi.org/project/refsr/), reference-based image super-resolution after "
             "RefVAE (Liu et al., *Variational AutoEncoder for Reference based Image Super-Resolution*). Each file "
             "is a safetensors checkpoint whose metadata holds the model config that rebuilds it.", "",
             "| file | scale | what it holds | steps | sha256 |", "| --- | --- | --- | --- | --- |"]
    for path, name, config, meta in checkpoints:
        texture = ("fidelity trunk (texture branch untrained)" if meta.get("stage") == "trunk"
                   else "fidelity trunk and texture branch")
        lines.append(f"| `{name}` | x{config.scale} | {texture} | {meta.get('step', 'n/a')} | "
                     f"`{sha256_of(path)}` |")
    where = f"{repo}@{revision}" if revision else repo
    lines += ["", "## Use", "", "```sh", "pip install refsr"]
    for _, name, config, _ in checkpoints:
        suffix = "" if name == default_filename(config.scale) else f":{name}"
        lines.append(f"refsr upscale photo.png --scale {config.scale} --weights {where}{suffix} -o out/")
    lines += ["```", "", "or in Python:", "", "```python", "from refsr_cli.checkpoint import load_model",
              f"model = load_model(\"{where}\", scale={checkpoints[0][2].scale})", "```", "",
              "## Config", ""]
    for _, name, config, _ in checkpoints:
        lines += [f"`{name}`:", "", "```json", json.dumps(json.loads(config.to_json()), indent=1), "```", ""]
    return "\n".join(lines)


def push(files: list, repo: str, revision: str | None = None, private: bool = False, message: str | None = None,
         card: bool = True, license: str | None = None) -> str:
    """Upload refsr checkpoints (and a generated README.md) to `repo` in one commit; creates the repository, and the
    branch `revision`, if needed. Returns the commit's URL. Everything is checked before the first request (a
    RefsrError: nothing was sent); what fails after it is an UploadFailed."""
    import_hub()
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
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
        if named is None or named["revision"] != revision:
            raise RefsrError(f"--revision {revision!r}: not a branch name --weights {repo}@BRANCH can load "
                             "(letters, digits, _ . / -)")
    checkpoints, names = [], {}
    for path in map(Path, files):
        if path.is_dir():
            raise RefsrError(f"{path}: is a folder, not a checkpoint")
        if not path.is_file():
            raise RefsrError(f"{path}: no such file")
        config = read_config(path)  # refuses anything that is not a refsr checkpoint
        check_finite(read_weights(path), path)  # weights that give black images are not published
        name = default_filename(config.scale)
        if name in names:
            raise RefsrError(f"{path} and {names[name]} are both x{config.scale} checkpoints; push one per scale")
        names[name] = path
        checkpoints.append((path, name, config, read_metadata(path)))
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for path, name, _, _ in checkpoints]
    if card:
        operations.append(CommitOperationAdd(path_in_repo="README.md",
                                             path_or_fileobj=model_card(repo, checkpoints, revision, license).encode()))
    api = HfApi()
    where = f"{repo}{'@' + revision if revision else ''}"
    try:
        with bounded_requests():
            api.create_repo(repo, private=private, exist_ok=True)
            if revision:
                api.create_branch(repo, branch=revision, exist_ok=True)
            info = api.create_commit(repo, operations, revision=revision,
                                     commit_message=message or f"refsr push: {', '.join(sorted(names))}")
    except RevisionNotFoundError:
        raise UploadFailed(f"{where}: no such branch on the Hub") from None
    except RepositoryNotFoundError:
        raise UploadFailed(f"{where}: no such repository, or no right to write to it") from None
    except HfHubHTTPError as e:
        status = getattr(e.response, "status_code", None)
        if status in (401, 403):
            raise UploadFailed(f"{where}: the Hub refused the upload ({status}): log in with `hf auth login` or set "
                               "HF_TOKEN to a token with write access") from None
        raise UploadFailed(f"{where}: upload failed ({(str(e).strip().splitlines() or ['HTTP error'])[0]})") from None
    except (OSError, ValueError, *http_client_errors()) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UploadFailed(f"{where}: upload failed ({reason})") from None
    return info.commit_url
