"""`refsr push`: checkpoints to a Hugging Face Hub model repository, with a model card, in one commit.

Each checkpoint goes up under the name `--weights owner/repo` looks for (refsr-x{scale}.safetensors), so what was
pushed loads back with `refsr upscale photo.png --weights owner/repo --scale S`. Downloads are in checkpoint.py.
"""
import json
from pathlib import Path

from .checkpoint import HUB_REF, default_filename, http_client_errors, read_config, read_metadata
from .errors import RefsrError
from .files import sha256_of


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
    branch `revision`, if needed. Returns the commit's URL."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    match = HUB_REF.match(repo)
    if match is None or match["revision"] or match["filename"]:
        raise RefsrError(f"{repo}: not a Hub repository name (owner/name)")
    checkpoints, names = [], {}
    for path in map(Path, files):
        if not path.is_file():
            raise RefsrError(f"{path}: no such file")
        config = read_config(path)  # refuses anything that is not a refsr checkpoint
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
        api.create_repo(repo, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo, branch=revision, exist_ok=True)
        info = api.create_commit(repo, operations, revision=revision,
                                 commit_message=message or f"refsr push: {', '.join(sorted(names))}")
    except RevisionNotFoundError:
        raise RefsrError(f"{where}: no such branch on the Hub") from None
    except RepositoryNotFoundError:
        raise RefsrError(f"{where}: no such repository, or no right to write to it") from None
    except HfHubHTTPError as e:
        status = getattr(e.response, "status_code", None)
        if status in (401, 403):
            raise RefsrError(f"{where}: the Hub refused the upload ({status}): log in with `hf auth login` or set "
                             "HF_TOKEN to a token with write access") from None
        raise RefsrError(f"{where}: upload failed ({(str(e).strip().splitlines() or ['HTTP error'])[0]})") from None
    except (OSError, ValueError, *http_client_errors()) as e:
        raise RefsrError(f"{where}: upload failed ({(str(e).strip().splitlines() or [type(e).__name__])[0]})") from None
    return info.commit_url
