"""The model file format: a safetensors file of the trained weights whose metadata holds the config that rebuilds
the network (and the step and stage that wrote it); the shipped files in weights/; the frozen ImageNet backbones.

One way in, `load_weights(spec, scale)`: the model and its file's metadata, from a local path, a Hub reference
`owner/repo[@revision][:filename]` (downloaded by refsr_cli.hub), or None for the shipped checkpoint of that scale.
The engine, training, push and the Python API all load through it. Nothing here unpickles anything.
"""
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .errors import RefsrError, check_torch_defaults, memory_named, name_trouble
from .files import atomic_path, read_unchanged, safetensors_name
from .model import RefVAE, RefVAEConfig, as_built, check_size, model_tensors
from .options import check_scale

FORMAT = "refsr-refvae"


def weights_dir() -> Path:
    """weights/ of a source checkout (beside its pyproject.toml), or its copy installed as package data in
    refsr_cli/weights/."""
    here = Path(__file__).resolve().parent
    checkout = here.parent / "weights"
    return checkout if (here.parent / "pyproject.toml").is_file() and checkout.is_dir() else here / "weights"


def default_filename(scale: int) -> str:
    return f"refsr-x{scale}.safetensors"


def not_finite(tensors: dict) -> str | None:
    """The name of the first floating-point tensor holding a nan or an inf, or None: weights that give black images.
    Checked as float32, what the network computes in: a float64 1e300 is an inf there."""
    return next((k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v.float()).all()),
                None)


def check_finite(tensors: dict, path) -> None:
    bad = not_finite(tensors)
    if bad is not None:
        raise RefsrError(f"{path}: its weights are not all finite numbers ({bad} holds nan or inf); it would give "
                         "black images")


def atomic_save(tensors: dict, path, metadata: dict) -> None:
    """Write to a temporary file beside `path`, then rename: a reader never sees half a checkpoint. Non-finite
    weights are refused before anything is written."""
    check_finite(tensors, path)
    safetensors_name(path)  # (its temporary's name is made of it)
    try:
        if weights_dir().resolve() in (Path(path).resolve().parent, Path(path).parent.resolve()):
            raise RefsrError(f"{path}: in refsr's own weights folder, which refsr never writes (its shipped "
                             "weights); save elsewhere")
        if Path(path).exists() and not Path(path).is_file():  # the rename would replace a folder's link or a FIFO
            raise RefsrError(f"{path}: not a regular file (a folder, device or FIFO); a checkpoint is written as a "
                             "file")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        check_unshared(tensors, path)
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata=metadata)
    except (SafetensorError, OSError) as e:  # a full disk, a folder gone: safetensors says "I/O error: ..."
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).split("I/O error: ")[-1]
        raise RefsrError(f"cannot write {path} ({reason}); what was there is kept") from None
    except ValueError as e:  # a NUL in the name
        raise RefsrError(f"cannot write {path} ({e})") from None
    except RuntimeError as e:  # Path.resolve's loop of links (before Python 3.13)
        if not name_trouble(e):
            raise
        raise RefsrError(f"cannot write {path} ({name_trouble(e)})") from None


def check_unshared(tensors: dict, path) -> None:
    """Each tensor in memory of its own, as safetensors writes them: weights tied by hand (one set to another) were
    refused by save_file in a many-line RuntimeError."""
    owners = {}
    for name, tensor in tensors.items():
        if tensor.numel():  # (every empty tensor's memory is at 0)
            other = owners.setdefault(tensor.untyped_storage().data_ptr(), name)
            if other != name:
                raise RefsrError(f"cannot write {path}: weights {other} and {name} share memory (tied); a checkpoint "
                                 "holds each weight as its own tensor (give each its own: .clone())")


def save_model(model: RefVAE, path, **extra_metadata) -> None:
    """`model` as a checkpoint load_weights reads back: its config, and `extra_metadata` (steps, stage...) beside it."""
    if not isinstance(model, RefVAE):
        raise RefsrError(f"save_model: give a RefVAE, not {type(model).__name__}")
    try:  # a path-like object as the name it stands for (its __fspath__ may give bytes, or anything)
        path = os.fsdecode(path) if isinstance(path, os.PathLike) else path
    except TypeError:
        raise RefsrError(f"save_model: {type(path).__name__}'s __fspath__ gives no file name") from None
    if not isinstance(path, str):
        raise RefsrError(f"save_model: give a file name, not {type(path).__name__}")
    if {"format", "config"} & set(extra_metadata):
        raise RefsrError("save_model: the format and config are the model's own; name other metadata")
    # Path() drops a trailing / or /.: "runs/" would be written as a file "runs".
    if os.fsdecode(path).endswith(("/", os.sep)) or os.path.basename(os.fsdecode(path)) in ("", ".", ".."):
        raise RefsrError(f"save_model: {os.fsdecode(path)!r} names a folder; give the file (folder/name.safetensors)")
    path = expanded(path)  # as load_weights reads it
    if any(t.is_meta for t in model.state_dict().values()):
        raise RefsrError("save_model: the model's weights are on the meta device (no numbers to save)")
    tensors = model_tensors(model)
    # What load_weights builds of its config, to read them back into: a config, weight or buffer changed by hand
    # was written, and then refused on load (or its imaginary part dropped).
    if (any(t.layout != torch.strided or t.is_complex() for t in tensors.values())
            or not as_built(model, tensors)):
        raise RefsrError("save_model: the model's weights are not those a model of its config has (names, shapes, "
                         "real numbers; changed since it was made?), and load_weights could not read them back")
    try:
        metadata = {"format": FORMAT, "config": model.config.to_json(),
                    **{k: str(v) for k, v in extra_metadata.items()}}
    except ValueError as e:  # an int past Python's 4300 digits for str()
        raise RefsrError(f"save_model: metadata that cannot be written as text ({e})") from None
    atomic_save(model.trainable_state_dict(), path, metadata)


def read_metadata(path) -> dict:
    try:
        with safe_open(safetensors_name(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise RefsrError(f"{path}: not a readable safetensors checkpoint ({e})") from None


def header_shapes(path) -> dict:
    """{name: shape} of a safetensors file's tensors, from its header alone (none of its data read)."""
    try:
        with safe_open(safetensors_name(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise RefsrError(f"{path}: not a readable safetensors checkpoint ({e})") from None


def check_tensor_names(path, config: RefVAEConfig) -> None:
    """Refuse, from the file's header alone (before any of its data is read), tensors other than those a model of
    `config` has: an extra tensor of gigabytes was read whole before the names were compared."""
    stored = header_shapes(path)
    with torch.device("meta"):  # (nothing allocated)
        expected = {k: tuple(v.shape) for k, v in RefVAE(config).trainable_state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
    wrong = [k for k in expected if k in stored and stored[k] != expected[k]]
    if missing or unexpected or wrong:
        raise RefsrError(f"{path}: weights do not match its config (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}, wrong shape {wrong[:3]})")


def read_weights(path) -> dict:
    """Every tensor of a safetensors file, refused in one line when unreadable or not all finite."""
    try:
        tensors = load_file(safetensors_name(path))
    except (SafetensorError, OSError) as e:
        raise RefsrError(f"{path}: cannot read the weights ({e})") from None
    for name, tensor in tensors.items():  # float4 is a float torch cannot convert: "copy_kernel not implemented"
        try:
            if tensor.is_floating_point():  # (the others are refused by what reads them)
                tensor.flatten()[:1].float()
        except (NotImplementedError, RuntimeError):
            raise RefsrError(f"{path}: {name} is {str(tensor.dtype).removeprefix('torch.')}, numbers refsr cannot "
                             "read") from None
    check_finite(tensors, path)
    return tensors


def read_config(path) -> RefVAEConfig:
    meta = read_metadata(path)
    if meta.get("format") != FORMAT or "config" not in meta:
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
        try:
            with memory_named(str(path)):
                state.update({k: v.float() for k, v in load_file(safetensors_name(path)).items()})
        except (SafetensorError, OSError) as e:  # a git-lfs pointer, a truncated copy
            raise RefsrError(f"backbone weights {path} are damaged ({e}); reinstall refsr, or see weights/README.md "
                             "to rebuild them") from None
    check_finite(state, weights_dir() / f"{names[0]}.safetensors")
    try:
        module.load_state_dict(state)
    except RuntimeError as e:  # other tensors than the network's
        raise RefsrError(f"backbone weights {', '.join(names)} in {weights_dir()} do not fit "
                         f"{type(module).__name__} ({(str(e).splitlines() or [''])[0]}); reinstall refsr") from None


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


@dataclass
class Weights:
    """A loaded checkpoint: the model (in eval mode), the file it came from, and that file's metadata."""
    model: RefVAE
    path: Path
    metadata: dict
    sha256: str  # of the file as it was read

    @property
    def texture_trained(self) -> bool:
        return texture_trained(self.metadata)


def texture_trained(metadata: dict) -> bool:
    """Whether a checkpoint's texture branch was trained: `refsr train --stage trunk` writes its branch at the
    initial state (a zero output layer, so that every z gives the fidelity output)."""
    return metadata.get("stage") != "trunk"


# Normal tensors, in a host's torch.inference_mode too: its inference tensors refused the weights' scan and every
# image after it, outside the block ("Inference tensors do not track version counter").
@torch.inference_mode(False)
def load_weights(spec, scale: int | None = None) -> Weights:
    """The one way in: the model of a local .safetensors file, of a Hub reference owner/repo[@revision][:filename]
    (downloaded into the Hugging Face cache), or, with spec None, of the shipped weights of `scale`; built from the
    config stored in the file. Refused in one line (RefsrError): another scale than `scale`, weights that do not fit
    their config exactly, or that are not all finite."""
    check_torch_defaults()  # (a default device of "meta" loaded a model of no numbers, and said nothing)
    if spec is None and scale is None:
        raise RefsrError("name the weights, or the scale of the shipped weights to load")
    if scale is not None:  # the Python API's: "2" or 2.0 named another file, and blamed the file
        check_scale(scale)
    # A path-like object or bytes as the name it stands for (str() of one is "<P object at ...>").
    try:
        name = None if spec is None else os.fsdecode(spec) if isinstance(spec, (bytes, os.PathLike)) else str(spec)
    except TypeError:  # an __fspath__ that gives no name
        raise RefsrError(f"weights: {type(spec).__name__}'s __fspath__ gives no file name") from None
    path = resolve_weights(name, scale)
    # Config, weights and metadata of one file, as it was when hashed (a train may be saving there).
    with memory_named(str(path)):  # (safetensors maps the file: an mmap the memory limit refuses)
        (config, state, metadata), sha256 = read_unchanged(path, lambda p: read_checked(p, scale))
    model = build_model(config)
    # Real floating-point numbers, cast to the model's float32: a complex weight (its nan unseen by not_finite) lost
    # its imaginary part, an int or bool one was taken as numbers.
    kinds = [f"{k} is {str(v.dtype).removeprefix('torch.')}" for k, v in state.items() if not v.is_floating_point()]
    if kinds:
        raise RefsrError(f"{path}: its weights are not all floating-point numbers ({kinds[0]})")
    model.load_state_dict(state, strict=False)
    return Weights(model.eval(), path, metadata, sha256)


def read_checked(path, scale: int | None) -> tuple:
    """(config, tensors, metadata) of a checkpoint: its config, and its tensors' names and shapes, checked before
    the tensors are read."""
    config = read_config(path)
    if scale is not None and config.scale != scale:
        raise RefsrError(f"{path}: an x{config.scale} checkpoint, but --scale {scale} was asked for")
    check_tensor_names(path, config)
    return config, read_weights(path), read_metadata(path)


def expanded(name) -> Path:
    """A file name with ~ or ~user as that home folder, as a shell gives it; a user without one is refused."""
    try:
        return Path(name).expanduser()
    except RuntimeError:  # "Could not determine home directory."
        raise RefsrError(f"{os.fsdecode(name)}: {os.fsdecode(name).split('/')[0]} is no home folder here") from None


def recorded_weights(spec: str | None, path: Path) -> str:
    """--weights as the outputs' record names it, for their redo command: "shipped"; a local file as it was given;
    a Hub reference pinned to the commit its file came from (owner/repo@COMMIT:FILE, from the cache's snapshot
    folder), so that the redo loads these very weights after the repository has moved on."""
    if spec is None:
        return "shipped"
    from .hub import HUB_REF, import_hub
    match = HUB_REF.match(spec)
    if expanded(spec).exists() or match is None:
        # A local file named "shipped" as ./shipped: the record's "shipped" is the shipped weights (no --weights).
        return "./shipped" if spec == "shipped" else spec
    # The file as hf_hub_download gives it: HF_HUB_CACHE/models--OWNER--REPO/snapshots/COMMIT/FILE, with the cache
    # expanded and resolved as it does (a relative, linked or ~ cache). Read relative to the cache, not by looking for
    # such names in the path: the cache's own path, or the repository's folders, may hold them too.
    cache = expanded(import_hub().HF_HUB_CACHE).resolve()
    snapshots = cache / f"models--{match['repo'].replace('/', '--')}" / "snapshots"
    try:
        commit, *file = Path(path).relative_to(snapshots).parts
    except ValueError:
        return spec
    if not re.fullmatch(r"[0-9a-f]{40}", commit):  # a server's X-Repo-Commit of "main": no pin, the branch it names
        return spec
    return f"{match['repo']}@{commit}:{'/'.join(file)}"


def resolve_weights(spec: str | None, scale: int | None) -> Path:
    """The local file for --weights: an existing path, a Hub reference (downloaded into the HF cache; without
    :filename, the file of `scale`), or the shipped checkpoint for `scale` when spec is None."""
    if spec is None:
        path = weights_dir() / default_filename(scale)
        if not path.is_file():
            raise RefsrError(f"no shipped x{scale} weights ({path}); pass --weights FILE or a Hub reference")
        return path
    if spec == "":
        raise RefsrError("--weights '': an empty name, not a file or a Hub reference")
    path = expanded(spec)
    try:
        exists = path.exists()
    except OSError as e:  # a name past 255 bytes: the system refuses to look
        raise RefsrError(f"{spec}: {e.strerror or e}") from None
    if exists:
        if not path.is_file():
            raise RefsrError(f"{spec}: is not a file")
        return path
    from .hub import HUB_REF, download_from_hub  # only for what is not a local file: the Hub client loads slowly
    match = HUB_REF.match(spec)
    # A missing local file such as dir/x.safetensors also has the owner/repo shape: refuse it as a file, but not
    # owner/repo:x.safetensors, where the name ending in .safetensors is the file in the repository.
    if match is None or match["repo"].endswith(".safetensors") or spec.startswith((".", "/", "~")):
        raise RefsrError(f"{spec}: no such file (and not a Hub reference owner/repo[@revision][:filename])")
    if match["filename"] is None and scale is None:
        raise RefsrError(f"{spec}: name the scale, or the file in the repository ({spec}:FILE)")
    path = download_from_hub(match["repo"], match["filename"] or default_filename(scale), match["revision"])
    if not path.is_file():  # the cache's copy made a FIFO or a link to /dev/zero (by hand): read, it would hang
        # The file in the way, named: the snapshot's link is made again to a blob that is there, whatever it is.
        raise RefsrError(f"{spec}: the Hugging Face cache's copy {os.path.realpath(path)} is not a regular file; "
                         "remove it to download it again")
    return path
