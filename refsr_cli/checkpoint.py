"""Checkpoints: safetensors files whose metadata holds the model config, found on disk, in weights/, or on the Hub.

One way in, `load_model(spec, scale)`, for a local path, a Hub reference `owner/repo[@revision][:filename]`, or
None for the shipped checkpoint of that scale. Nothing here unpickles anything.
"""
import importlib
import re
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .errors import RefsrError
from .files import atomic_path
from .model import RefVAE, RefVAEConfig, check_size

FORMAT = "refsr-refvae"
HUB_REF = re.compile(r"^(?P<repo>[\w.-]+/[\w.-]+?)(?:@(?P<revision>[\w./-]+?))?(?::(?P<filename>[\w./-]+))?$")


def weights_dir() -> Path:
    """weights/ of a source checkout, or its copy installed as package data in refsr_cli/weights/."""
    here = Path(__file__).resolve().parent
    checkout = here.parent / "weights"
    return checkout if (checkout / "README.md").is_file() else here / "weights"


def default_filename(scale: int) -> str:
    return f"refsr-x{scale}.safetensors"


def not_finite(tensors: dict) -> str | None:
    """The name of the first floating-point tensor holding a nan or an inf, or None: weights that give black images."""
    return next((k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)


def check_finite(tensors: dict, path) -> None:
    bad = not_finite(tensors)
    if bad is not None:
        raise RefsrError(f"{path}: its weights are not all finite numbers ({bad} holds nan or inf); it would give "
                         "black images")


def atomic_save(tensors: dict, path, metadata: dict) -> None:
    """Write to a temporary file beside `path`, then rename: a reader never sees half a checkpoint. Non-finite
    weights are refused before anything is written."""
    check_finite(tensors, path)
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
    except (SafetensorError, OSError) as e:  # a full disk, a folder gone: safetensors says "I/O error: ..."
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).split("I/O error: ")[-1]
        raise RefsrError(f"cannot write {path} ({reason}); what was there is kept") from None


def save_model(model: RefVAE, path, **extra_metadata) -> None:
    metadata = {"format": FORMAT, "config": model.config.to_json(),
                **{k: str(v) for k, v in extra_metadata.items()}}
    atomic_save(model.trainable_state_dict(), path, metadata)


def read_metadata(path) -> dict:
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise RefsrError(f"{path}: not a readable safetensors checkpoint ({e})") from None


def read_weights(path) -> dict:
    """Every tensor of a safetensors file, refused in one line when unreadable or not all finite."""
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise RefsrError(f"{path}: cannot read the weights ({e})") from None
    check_finite(tensors, path)
    return tensors


def read_config(path, fmt: str = FORMAT) -> RefVAEConfig:
    meta = read_metadata(path)
    if meta.get("format") != fmt or "config" not in meta:
        raise RefsrError(f"{path}: a safetensors file, but not a refsr checkpoint (no refsr config in its metadata)")
    return stored_config(meta, path)


def stored_config(meta: dict, path) -> RefVAEConfig:
    """The model config in a file's metadata, refused in one line when damaged or absurdly large (checked on the
    meta device, before anything is allocated)."""
    try:
        config = RefVAEConfig.from_json(meta["config"])
        check_size(config)
        return config
    except (ValueError, TypeError, RecursionError) as e:
        raise RefsrError(f"{path}: unusable model config: {e}") from None


def load_backbone(module: torch.nn.Module, *names: str) -> None:
    """The converted ImageNet weights of `module` from the shipped files `names` (together: all its weights), each
    tensor cast to the module's float32."""
    state = {}
    for name in names:
        path = weights_dir() / f"{name}.safetensors"
        if not path.is_file():
            raise RefsrError(f"backbone weights {path} are missing (see weights/README.md to rebuild them)")
        state.update({k: v.float() for k, v in load_file(str(path)).items()})
    check_finite(state, weights_dir() / f"{names[0]}.safetensors")
    module.load_state_dict(state)


def build_model(config: RefVAEConfig) -> RefVAE:
    """A model of this config with the frozen VGG16 loaded and the rest freshly initialised; refused (RefsrError)
    before anything is allocated when it would be absurdly large."""
    try:
        check_size(config)
    except ValueError as e:
        raise RefsrError(f"unusable model config: {e}") from None
    model = RefVAE(config)
    load_backbone(model.vgg, "vgg16_relu4_1")
    return model


def load_checkpoint(path, scale: int | None = None, fmt: str = FORMAT, prefix: str = "") -> RefVAE:
    """Build the model from the config stored in `path` and load its weights (those under `prefix`, in a file that
    holds more); refuse another scale, and weights that do not fit the config exactly."""
    config = read_config(path, fmt)
    if scale is not None and config.scale != scale:
        raise RefsrError(f"{path}: a x{config.scale} checkpoint, but --scale {scale} was asked for")
    model = build_model(config)
    state = {k[len(prefix):]: v for k, v in read_weights(path).items() if k.startswith(prefix)}
    expected = model.trainable_state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise RefsrError(f"{path}: weights do not match its config (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}, wrong shape {wrong[:3]})")
    model.load_state_dict(state, strict=False)
    return model.eval()


def load_model(spec: str | None, scale: int | None = None) -> RefVAE:
    """The one way in: a model from a local .safetensors file, a Hub reference owner/repo[@revision][:filename]
    (downloaded into the Hugging Face cache), or, with spec None, the shipped weights of `scale`."""
    if spec is None and scale is None:
        raise RefsrError("name the weights, or the scale of the shipped weights to load")
    return load_checkpoint(resolve_weights(spec, scale), scale)


def resolve_weights(spec: str | None, scale: int | None) -> Path:
    """The local file for --weights: an existing path, a Hub reference (downloaded into the HF cache; without
    :filename, the file of `scale`), or the shipped checkpoint for `scale` when spec is None."""
    if spec is None:
        path = weights_dir() / default_filename(scale)
        if not path.is_file():
            raise RefsrError(f"no shipped x{scale} weights ({path}); pass --weights FILE or a Hub reference")
        return path
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_file():
            raise RefsrError(f"{spec}: is not a file")
        return path
    match = HUB_REF.match(spec)
    # A missing local file such as dir/x.safetensors also has the owner/repo shape: refuse it as a file, but not
    # owner/repo:x.safetensors, where the name ending in .safetensors is the file in the repository.
    if match is None or match["repo"].endswith(".safetensors") or spec.startswith((".", "/", "~")):
        raise RefsrError(f"{spec}: no such file (and not a Hub reference owner/repo[@revision][:filename])")
    if match["filename"] is None and scale is None:
        raise RefsrError(f"{spec}: name the scale, or the file in the repository ({spec}:FILE)")
    return download_from_hub(match["repo"], match["filename"] or default_filename(scale), match["revision"])


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


HUB_TIMEOUT = 5  # seconds the Hub has to answer where a file is (huggingface_hub's own: 10, then retries)


@contextmanager
def hub_fails_fast():
    """hf_hub_download without its retries of a Hub that cannot be reached. When its request for a file's metadata
    fails on the network (or with a 5xx) and the file is not cached, huggingface_hub 2.x asks again with a 60 s
    timeout (file_download._ETAG_RETRY_TIMEOUT) and 5 retries backed off 1+2+4+8+8 s (utils/_http.py, http_backoff):
    26 s before an error when the connection is refused, minutes when nobody answers. A command line is better
    served by an error within HUB_TIMEOUT that says how to use the cache; a cached file is still returned (that
    fallback never retried). These module globals of file_download are set for the duration of refsr's call only
    (refsr downloads from one thread), and only those this version has: another keeps its own behaviour."""
    from huggingface_hub import file_download
    bounds = {"_DEFAULT_RETRY_ON_EXCEPTIONS": (), "_DEFAULT_RETRY_ON_STATUS_CODES": (),
              "_ETAG_RETRY_TIMEOUT": HUB_TIMEOUT}
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
    except ValueError as e:
        raise RefsrError(f"huggingface_hub cannot start: {e} (check the HF_* environment variables)") from None
    return constants


def download_from_hub(repo: str, filename: str, revision: str | None) -> Path:
    """The file from the Hugging Face cache, downloaded there if needed; an error within seconds when the Hub
    cannot be reached and the file is not cached (HUB_TIMEOUT; HF_HUB_ETAG_TIMEOUT, when set, takes precedence)."""
    constants = import_hub()
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)
    where = f"{repo}{'@' + revision if revision else ''}:{filename}"
    try:
        with hub_fails_fast():
            return Path(hf_hub_download(repo_id=repo, filename=filename, revision=revision, etag_timeout=HUB_TIMEOUT))
    except RevisionNotFoundError:
        raise RefsrError(f"{where}: no such revision on the Hub") from None
    except LocalEntryNotFoundError as e:  # before EntryNotFoundError, its base: "not cached", not "not on the Hub"
        if constants.HF_HUB_OFFLINE:
            raise RefsrError(f"{where}: offline mode (HF_HUB_OFFLINE=1) is on and the file is not in the local "
                             "cache; download it once online first") from None
        # The cause, when huggingface_hub kept it: "[Errno 111] Connection refused", "timed out", an HTTP status.
        cause = (str(e.__cause__).strip().splitlines() or [type(e.__cause__).__name__])[0] if e.__cause__ else ""
        if "Timeout" in type(e.__cause__).__name__:  # ConnectTimeout, ReadTimeout: a slow network may need longer
            cause += f"; HF_HUB_ETAG_TIMEOUT=SECONDS waits longer than {HUB_TIMEOUT} s"
        raise RefsrError(f"{where}: the Hub cannot be reached{f' ({cause})' if cause else ''} and the file is not in "
                         "the local cache (once downloaded, it works offline with HF_HUB_OFFLINE=1)") from None
    except EntryNotFoundError:
        raise RefsrError(f"{where}: no such file in that Hub repository") from None
    except RepositoryNotFoundError:
        raise RefsrError(f"{where}: no such Hub repository (or it is private)") from None
    except (OSError, *http_client_errors()) as e:
        # The first line only: huggingface_hub's HTTP errors add lines of URL and request details.
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise RefsrError(f"{where}: download failed ({reason}); set HF_HUB_OFFLINE=1 to use the cache only") from None
    except ValueError as e:  # HFValidationError: a name the Hub forbids, e.g. owner/re..po or a ../ file
        raise RefsrError(f"{where}: not a valid Hub reference ({e})") from None



# --- training states: what `refsr train --resume` continues from ------------------------------------------------

STATE_FORMAT = "refsr-training-state-2"


def _optimizer_tensors(prefix: str, optimizer) -> dict:
    return {f"{prefix}.{i}.{k}": v for i, st in optimizer.state_dict()["state"].items() for k, v in st.items()
            if torch.is_tensor(v)}


def _optimizer_state(tensors: dict, prefix: str, param_groups: list) -> dict:
    state = {}
    for key, value in tensors.items():
        if key.startswith(prefix + "."):
            i, name = key[len(prefix) + 1:].split(".", 1)
            state.setdefault(int(i), {})[name] = value
    return {"state": state, "param_groups": param_groups}


def save_training_state(path, stage, step: int, optimizer, scaler, recipe: dict, disc=None,
                        disc_optimizer=None) -> None:
    """The trained module of a training stage, its optimizer, the loss scaler and the step (and the
    discriminator) in one file, so that they can never be from different steps."""
    import json
    tensors = {f"module.{k}": v for k, v in stage.trained_state().items()}
    tensors.update(_optimizer_tensors("optimizer", optimizer))
    meta = {"format": STATE_FORMAT, "stage": stage.name, "step": str(step), "config": stage.config.to_json(),
            "param_groups": json.dumps(optimizer.state_dict()["param_groups"]),
            "scaler": json.dumps(scaler.state_dict()), "recipe": json.dumps(recipe)}
    if disc is not None:
        tensors.update({f"disc.{k}": v for k, v in disc.state_dict().items()})
        tensors.update(_optimizer_tensors("disc_optimizer", disc_optimizer))
        meta["disc_param_groups"] = json.dumps(disc_optimizer.state_dict()["param_groups"])
    atomic_save(tensors, path, meta)


def load_training_state(path, recipe: dict) -> dict:
    """What save_training_state wrote: {meta, step, module, optimizer, scaler[, disc, disc_optimizer]}; refused
    unless it was written by a run of the same `recipe`."""
    import json
    meta = read_metadata(path)
    if meta.get("format") != STATE_FORMAT:
        raise RefsrError(f"--resume: {path} is not a training state this refsr reads")
    try:
        trained_with = json.loads(meta["recipe"])
        if trained_with != recipe:
            changed = sorted(k for k in recipe if trained_with.get(k) != recipe[k])
            raise RefsrError(f"--resume: {path} was trained with {trained_with}; resume with the same options "
                             f"({', '.join(changed)} differ)")
        tensors = read_weights(path)
        part = lambda prefix: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        state = {"meta": meta, "config": stored_config(meta, path), "step": int(meta["step"]),
                 "module": part("module."), "scaler": json.loads(meta["scaler"]),
                 "optimizer": _optimizer_state(tensors, "optimizer", json.loads(meta["param_groups"]))}
        if "disc_param_groups" in meta:
            state["disc"] = part("disc.")
            state["disc_optimizer"] = _optimizer_state(tensors, "disc_optimizer",
                                                       json.loads(meta["disc_param_groups"]))
    except (KeyError, ValueError, TypeError, AttributeError, RecursionError) as e:
        raise RefsrError(f"--resume: {path} is a damaged training state ({type(e).__name__}: {e})") from None
    return state
