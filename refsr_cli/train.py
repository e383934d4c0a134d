"""`refsr train`: one loop over a stage (stages.py), training the very modules that inference loads.

Read top to bottom: the run's setup (the launcher's ranks, the run folder, what --resume continues), the stage, the
optimizer, then one `for step in range(start, steps)` loop (learning rate, losses, step, log, validate, save), and
the training-state format the loop saves and resumes. The run folder holds the exported checkpoints,
`last.state.safetensors` (the trained module, its optimizer and the step, for --resume) and `log.jsonl` (one row of
losses per logged step). Under `torchrun --nproc_per_node=N refsr train ...` every rank draws its own batch and the
gradients are averaged over the ranks before each step (gloo on the CPU, NCCL on CUDA); rank 0 alone writes files
and validates.
"""
import contextlib
import fcntl
import json
import math
import os
import re
import stat
import time
from pathlib import Path

import torch

from .checkpoint import (FORMAT, atomic_save, header_shapes, not_finite, read_metadata, read_weights, stored_config,
                         weights_dir)
from .device import environment_int, launcher, pick_device
from .errors import RefsrError
from .files import atomic_path, held_folder, safetensors_name
from .losses import PatchDiscriminator
from .model import FidelityTrunk, RefVAE
from .options import SCALES, TrainOptions
from .stages import TextureStage, TrunkStage

STAGES = {"trunk": TrunkStage, "texture": TextureStage}
STATE_FILE = "last.state.safetensors"  # in --out: the trained module, its optimizer and the step, for --resume


def train(opt: TrainOptions, progress=None) -> Path:
    """Run `opt`; return the path of its last checkpoint (of the largest scale, for the trunk stage)."""
    fit(opt, progress)
    return opt.out / (f"x{max(opt.scales)}.safetensors" if opt.stage == "trunk" else "last.safetensors")


def fit(opt: TrainOptions, progress=None):
    """The training loop; returns the trained module (on every rank, under torchrun).

    `progress(step, steps, losses, steps_per_second)` is called after every step, on rank 0; after a validation,
    `losses` also holds its val_* measures."""
    rank, world, device = start_distributed(pick_device(opt.device))
    state_path = opt.out / STATE_FILE
    check_run_folder(opt, state_path)
    created = rank == 0 and not opt.out.exists()
    if rank == 0:
        make_run_folder(opt.out)
    try:
        with run_lock(opt.out) if rank == 0 else contextlib.nullcontext():
            claimed = claim_run_folder(opt, state_path) if rank == 0 else None
            return run(opt, rank, world, device, state_path, progress, claimed)
    except BaseException:
        if created and opt.out.is_dir() and not any(opt.out.iterdir()):  # refused before its first save: no empty
            opt.out.rmdir()                                                   # folder left (unless it is gone)
        raise


def run(opt: TrainOptions, rank: int, world: int, device, state_path: Path, progress, claimed):
    """The stage, the optimizer, and the loop over the steps (fit() has checked and claimed the run folder)."""
    state = load_training_state(state_path, recipe(opt)) if opt.resume else None
    stage = STAGES[opt.stage](opt, device, rank, state)
    optimizer = torch.optim.Adam(stage.parameter_groups(), lr=opt.learning_rate, betas=(0.9, 0.99))
    optimizers = [optimizer] + ([stage.critic.optimizer] if stage.critic is not None else [])
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    start = 0 if state is None else resume(state, optimizer, scaler, stage.critic)
    behind = state is not None and export_behind(opt, stage, state_path, start, rank, claimed)
    if start >= opt.steps:
        if behind:  # what the killed run was saving, now saved: the run is done
            return stage.module
        raise RefsrError(f"--resume: the run in {opt.out} is at step {start} already; give --steps above it")
    weights = loss_weights(opt)
    if opt.overwrite and not opt.resume and rank == 0:
        # A fresh run, past every check that could refuse it (its --init, its memory, its data): the old run's state
        # and log, which would mislead a --resume, go now, not when the folder was claimed (a refused run took them).
        state_path.unlink(missing_ok=True)
        (opt.out / "log.jsonl").unlink(missing_ok=True)
        claimed.saved()
    log = RunLog(opt, start, progress) if rank == 0 else None

    saved = [start if state is not None else None]  # the step of the run's last checkpoint

    def save(step):
        claimed.check(step)
        # The training state first: --resume reads only it, so a kill between the writes loses nothing.
        save_training_state(state_path, stage, step, optimizer, scaler, recipe(opt))
        claimed.check_folder(step)  # (the writes would make it anew: a run's files in a folder of their own)
        stage.export(step)
        claimed.saved()
        saved[0] = step

    try:
        for step in range(start, opt.steps):
            set_learning_rate(optimizers, opt, step)
            # AMP on CUDA (float16 activations, float32 weights and loss scaling); a no-op elsewhere.
            with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
                terms, notes = stage.losses(step)
            loss = sum(weights[k] * v for k, v in terms.items() if k in weights)
            descend(loss, optimizer, stage.module, world, step, scaler)
            if stage.critic is not None:
                terms["disc"] = stage.critic.loss()
                descend(terms["disc"], stage.critic.optimizer, stage.critic.module, world, step)
            if log is not None:
                log.after(step + 1, {"loss": loss} | notes | terms, list(notes), optimizer.param_groups[0]["lr"],
                          stage.validate if opt.val else None, lambda: save(step + 1))
        return stage.module
    except Diverged as e:
        raise RefsrError(diverged_line(opt, e, saved[0])) from None
    except RuntimeError as e:
        if world > 1 and peer_lost(e):  # (it read "internal error, please report it")
            raise RankLost(lost_rank_line(e, state_path)) from None
        raise
    finally:
        if log is not None:
            log.close()
        if world > 1:
            import torch.distributed as dist
            dist.destroy_process_group()


def check_run_folder(opt: TrainOptions, state_path: Path) -> None:
    """Refuse contradicting flags, an --out that is one of the run's image folders, a run that would write over its
    own --init, and a --resume with nothing to resume."""
    if opt.resume and opt.overwrite:
        raise RefsrError("--resume continues the run in --out and --overwrite replaces it: choose one")
    if opt.resume and opt.init:
        raise RefsrError("--init starts a run from weights and --resume continues one from its state: choose one")
    if opt.stage == "trunk" and opt.refs:
        raise RefsrError("--refs: the trunk stage has no reference outputs (pixel losses only); give it to the "
                         "texture stage")
    if opt.refs and not (opt.ref_share > 0 and opt.ref_mix > 0):  # no reference output would come from them
        raise RefsrError(f"--refs: with --ref-share {opt.ref_share:g} and --ref-mix {opt.ref_mix:g} no reference "
                         "is taken from them; raise both above 0, or leave --refs out")
    weights = loss_weights(opt)
    if not any(weight > 0 for weight in weights.values()):
        flags = ", ".join(f"--{name.replace('lr_cons', 'lr-consistency')}-weight" for name in weights)
        raise RefsrError(f"every loss weight of the {opt.stage} stage is 0 ({flags}): it would learn nothing")
    if opt.out.resolve() == weights_dir().resolve():  # its checkpoints would be refused there, after the work
        raise RefsrError(f"--out {opt.out}: refsr's own weights folder, which refsr never writes; give the run a "
                         "folder of its own")
    inputs = {Path(p).resolve() for p in [*opt.data, *(opt.refs or []), opt.val] if p is not None}
    if opt.out.resolve() in inputs:
        raise RefsrError(f"--out {opt.out} is a folder of this run's images; give the run a folder of its own")
    # What the run saves (a texture run no x*.safetensors: another --init there is refused as a run in --out)
    clash = [p for p in opt.init or [] if Path(p).resolve() in {w.resolve() for w in saved_files(opt, state_path)}]
    if clash:
        raise RefsrError(f"--init {clash[0]}: this run would write over it; copy it out of {opt.out} first")
    if opt.resume and not state_path.is_file():
        raise RefsrError(f"--resume: no checkpoint to resume in {opt.out}")


def loss_weights(opt: TrainOptions) -> dict:
    """The weight of each loss term that opt's stage computes, by the term's name in its losses: the trunk's pixel
    terms; the texture stage's, with its reference outputs' only when a share of the batch is decoded from one."""
    weights = {"l1": opt.l1_weight, "lr_cons": opt.lr_consistency_weight}
    if opt.stage == "texture":
        weights |= {"imle": opt.imle_weight, "flat": opt.flat_weight, "adv": opt.adv_weight}
        if opt.ref_share > 0:
            weights |= {"content": opt.content_weight, "style": opt.style_weight, "kl": opt.kl_weight}
    return weights


def run_files(opt: TrainOptions, state_path: Path) -> list:
    """What a run writes in --out: its training state, its checkpoints (either stage's), its log."""
    return [state_path, opt.out / "last.safetensors", *(opt.out / f"x{s}.safetensors" for s in opt.scales),
            opt.out / "log.jsonl"]


def saved_files(opt: TrainOptions, state_path: Path) -> list:
    """What this run's saves write: its training state and its stage's checkpoints."""
    checkpoints = ([opt.out / f"x{s}.safetensors" for s in opt.scales] if opt.stage == "trunk"
                   else [opt.out / "last.safetensors"])
    return [state_path, *checkpoints]


def export_behind(opt: TrainOptions, stage, state_path: Path, step: int, rank: int, claimed) -> bool:
    """A resumed run killed between a save's two writes (the state, then the checkpoints) has checkpoints of an
    earlier step, or none: they are made again from the state, which --resume reads. Whether they were."""
    if not stale_checkpoints(opt, state_path, step):
        return False
    if rank == 0:
        claimed.check(step)
        stage.export(step)
        claimed.saved()
    return True


def stale_checkpoints(opt: TrainOptions, state_path: Path, step: int) -> bool:
    """Whether a checkpoint of this run is missing, or of another step than its training state's `step`."""
    for path in saved_files(opt, state_path)[1:]:
        try:
            if not path.is_file() or read_metadata(path).get("step") != str(step):
                return True
        except RefsrError:  # unreadable: not what the run saved
            return True
    return False


def claim_run_folder(opt: TrainOptions, state_path: Path) -> "Claimed":
    """Under the run's lock: refuse an --out holding a run (any checkpoint, or a log alone: a run killed before its
    first save, or the user's) without --resume or --overwrite; clear what a fresh --overwrite replaces, and the
    temporary files a killed run of ours left. Returns the run's files as claimed."""
    written = run_files(opt, state_path)
    if not opt.resume and not opt.overwrite:
        # (Another scale's checkpoint too: a fresh --scales 2 wrote x2 beside a run's x8, two runs in one folder.)
        held = [p for p in sorted({*written, *(opt.out / f"x{s}.safetensors" for s in SCALES)}) if p.exists()]
        if held:
            raise RefsrError(f"{opt.out} holds a run already ({held[0].name}): --resume it, --overwrite it, or give "
                             "another --out")
    if opt.overwrite:  # a checkpoint it would not replace would stay beside its own: two runs in one folder
        saves = saved_files(opt, state_path)[1:]
        kept = sorted({*opt.out.glob("x*.safetensors"), *opt.out.glob("last.safetensors")} - set(saves))
        if kept:
            raise RefsrError(f"--overwrite: {opt.out} holds {kept[0].name}, which this run would not replace (it "
                             f"saves {', '.join(p.name for p in saves)}); move it away, or give another --out")
    remove_stale_temporaries(opt.out)
    for path in saved_files(opt, state_path):  # refused now, not at the first save after hours of steps
        safetensors_name(path)
        if path.exists() and not path.is_file():  # as atomic_save would refuse it
            raise RefsrError(f"{path}: not a regular file (a folder, device or FIFO) where this run saves; move it "
                             "away, or give another --out")
    return Claimed(opt.out, saved_files(opt, state_path))


class Claimed:
    """The run's checkpoints and state as it last saved them (or found them, when it claimed the folder). One that
    differs at the next save was written by another process meanwhile (the run lock keeps out only refsr's): it is
    kept, and the run stops rather than replace it."""

    def __init__(self, folder: Path, paths: list):
        self.folder, self.folder_seen = folder, folder_identity(folder)
        self.seen = {p: identity(p) for p in paths}

    def check_folder(self, step: int) -> None:
        """The run folder as claimed: one removed or moved meanwhile is not made anew by the next write."""
        if folder_identity(self.folder) != self.folder_seen:
            raise RefsrError(f"{self.folder} was removed or moved while this run trained; it stops at step {step}, "
                             "and what it saved before is wherever the folder went (--resume it there)")

    def check(self, step: int) -> None:
        self.check_folder(step)
        for path, seen in self.seen.items():
            if identity(path) != seen:
                raise RefsrError(f"{path} changed while this run trained (another process wrote it?); it is kept and "
                                 f"the run stops before saving step {step}: move it away, then --resume")

    def saved(self) -> None:
        self.seen = {p: identity(p) for p in self.seen}


def identity(path: Path):
    """Which file stands at `path`, as far as a save can tell: None for none, else inode, size and mtime."""
    try:
        return signature(os.lstat(path))
    except FileNotFoundError:
        return None


def folder_identity(folder: Path):
    """Which folder `folder` names (through a link, as the run writes into it): None for none."""
    try:
        st = os.stat(folder)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


def identity_of(file) -> tuple:
    """identity() of an open file."""
    return signature(os.fstat(file.fileno()))


def signature(st: os.stat_result) -> tuple:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def resume(state: dict, optimizer, scaler, critic) -> int:
    """The optimizer, loss scaler and critic of a resumed run put back as they were saved; returns the step."""
    try:
        check_adam_state(optimizer, state["optimizer"])
        optimizer.load_state_dict(state["optimizer"])
        if state["scaler"]:  # a state saved without CUDA has an empty scaler: a CUDA run starts its own
            scaler.load_state_dict(state["scaler"])
        if critic is not None and "disc" in state:
            critic.module.load_state_dict(state["disc"])
            check_adam_state(critic.optimizer, state["disc_optimizer"])
            critic.optimizer.load_state_dict(state["disc_optimizer"])
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as e:
        raise RefsrError(f"--resume: a damaged training state ({type(e).__name__}: "
                         f"{(str(e).splitlines() or [''])[0]})") from None
    return state["step"]


def check_adam_state(optimizer, saved: dict) -> None:
    """ValueError unless `saved` (an Adam's state_dict, as read back) fits `optimizer`: the settings this run made
    (betas, eps, weight decay...; the learning rate, which a schedule moves, above 0) and each parameter's moments
    of that parameter's shape. torch checks neither: a moment of another shape fails at the first step, and betas
    of 2 train on."""
    groups = saved["param_groups"]
    if len(groups) != len(optimizer.param_groups):
        raise ValueError(f"{len(groups)} parameter groups, the optimizer {len(optimizer.param_groups)}")
    params = {}
    for group, mine in zip(groups, optimizer.param_groups):
        changed = sorted(k for k in (group.keys() & mine.keys()) - {"params", "lr", "initial_lr"}
                         if normalised(group[k]) != normalised(mine[k]))
        if changed or not group["lr"] > 0:
            raise ValueError("optimizer settings this run does not make: " + ", ".join(
                f"{k} {group[k]!r}" for k in changed or ["lr"]))
        if len(group["params"]) != len(mine["params"]):
            raise ValueError(f"a group of {len(group['params'])} parameters, the optimizer's of {len(mine['params'])}")
        params.update(zip(group["params"], mine["params"]))
    for i, moments in saved["state"].items():
        if i not in params:
            raise ValueError(f"the state of parameter {i}, which no group holds")
        for name, tensor in moments.items():
            shape = () if name == "step" else params[i].shape
            if tensor.numel() != math.prod(shape) or (name != "step" and tensor.shape != shape):
                raise ValueError(f"{name} of parameter {i} is {tuple(tensor.shape)}, the parameter {tuple(shape)}")


def normalised(value):
    """A setting as JSON gives it back: (0.9, 0.99) is [0.9, 0.99]."""
    return list(value) if isinstance(value, tuple) else value


def recipe(opt: TrainOptions) -> dict:
    """The options a resumed run must share with the run it continues (--steps may grow)."""
    keys = ["stage", "seed", "batch", "lr_patch", "learning_rate"]
    keys += ["scales"] if opt.stage == "trunk" else ["scale", "modulation_lr_scale", "imle_samples", "pool_size",
                                                      "crop_uses"]
    return {k: list(v) if isinstance(v, tuple) else v for k, v in ((k, getattr(opt, k)) for k in keys)}


def make_run_folder(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise RefsrError(f"--out {out}: a file stands where the run folder or one of its parents would be") from None
    except OSError as e:
        raise RefsrError(f"--out {out}: cannot create the run folder ({e.strerror})") from None


def remove_stale_temporaries(out: Path) -> None:
    """What a run killed (SIGKILL) in the middle of a save left."""
    # Left by a run killed (SIGKILL) in the middle of a save: atomic_path's temporary names of this run's files, and
    # safetensors' own (".tmp" and six characters, written before it renames onto ours) when it holds a refsr header.
    # Any other file is the user's, whatever its name.
    ours = re.compile(r"\.(last|last\.state|x[248]|log)\.\w{8}\.(safetensors|jsonl)\.tmp")
    for stale in out.iterdir():
        if stale.is_file() and (ours.fullmatch(stale.name) or re.fullmatch(r"\.tmp\w{6}", stale.name)
                                and refsr_safetensors(stale)):
            stale.unlink(missing_ok=True)


def refsr_safetensors(path: Path) -> bool:
    """Whether a file starts with the header of a safetensors file refsr wrote (a checkpoint or a training state)."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size)) if 0 < size < 1 << 24 else {}
    except (OSError, ValueError):
        return False
    return isinstance(header, dict) and (header.get("__metadata__") or {}).get("format") in (FORMAT, STATE_FORMAT)


@contextlib.contextmanager
def run_lock(out: Path):
    """One training run at a time in a folder: an exclusive lock (released by the kernel when the process dies, so a
    killed run never blocks the next), held from the check of what --out holds to the last save. The lock file is
    removed at the end; a run that locked it just before is told by its inode, which is then no longer the path's."""
    path = out / ".refsr-train.lock"
    busy = RefsrError(f"--out {out}: another refsr train is running there")
    try:  # not through a link, and never waiting on a FIFO
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    except OSError as e:
        raise RefsrError(f"--out {out}: cannot take the run's lock {path.name} ({e.strerror or e})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise RefsrError(f"--out {out}: {path.name} is not a regular file")
        if os.fstat(fd).st_size > 0:  # refsr's lock is always empty: this file is someone's, and the end removes it
            raise RefsrError(f"--out {out}: {path.name} holds data, and refsr's run lock never does (a file of "
                             "yours?); move it away")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise busy from None
        try:
            if os.stat(path, follow_symlinks=False).st_ino != os.fstat(fd).st_ino:
                raise busy  # the run that held it removed it meanwhile: a newer run may hold the path's file
        except FileNotFoundError:
            raise busy from None
        folder = held_folder(out)  # to remove the lock from the folder wherever it was moved meanwhile
        try:
            yield
        finally:
            try:
                if folder is not None:
                    os.unlink(path.name, dir_fd=folder)
                else:
                    path.unlink()
            except FileNotFoundError:
                pass
            finally:
                if folder is not None:
                    os.close(folder)
    finally:
        os.close(fd)


def start_distributed(device: torch.device):
    """(rank, world size, device) under torchrun (WORLD_SIZE set), else (0, 1, device). The launcher's variables
    are checked as upscale checks them (one line naming a bad one)."""
    found = launcher()
    if found is None or found[1] == 1:
        return 0, 1, device
    rank, world, rank_name = found
    if rank_name != "RANK":  # srun alone: copies that know nothing of each other, all writing one run folder
        raise RefsrError(f"SLURM_STEP_NUM_TASKS={world}: train's ranks are started by torchrun (srun torchrun "
                         "--nproc_per_node=N refsr train ...), not by srun alone")
    import torch.distributed as dist
    if device.type == "cuda":
        local = environment_int("LOCAL_RANK") or 0
        if local >= torch.cuda.device_count():
            raise RefsrError(f"LOCAL_RANK={local} is not below the {torch.cuda.device_count()} CUDA devices here")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    for name in ("MASTER_ADDR", "MASTER_PORT"):  # what torchrun sets and a hand-made RANK/WORLD_SIZE lacks
        if not os.environ.get(name):
            raise RefsrError(f"WORLD_SIZE={world} but {name} is not set: start train's ranks with torchrun "
                             "--nproc_per_node=N refsr train ...")
    port = os.environ["MASTER_PORT"]
    if not (port.isascii() and port.isdigit() and len(port) <= 5 and 0 < int(port) < 65536):
        raise RefsrError(f"MASTER_PORT={port!r}: not a port (1 to 65535)")
    try:
        with signals_end_the_wait():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    except (ValueError, RuntimeError) as e:  # a MASTER_ADDR no one answers at, a port taken
        raise RefsrError(f"the ranks cannot meet at MASTER_ADDR={os.environ['MASTER_ADDR']} MASTER_PORT={port} "
                         f"({(str(e).splitlines() or [''])[0]})") from None
    return dist.get_rank(), world, device


@contextlib.contextmanager
def signals_end_the_wait():
    """SIGINT and SIGTERM while torch waits in C++ for the other ranks (30 minutes by default): Python runs its
    handlers only when that call returns, and a run whose other ranks never came was deaf to both. The signal
    module's C handler still writes the signal's number to a wakeup fd, and a thread reading it ends the process
    with the signal's line and exit code (nothing is written before the ranks have met)."""
    import signal
    import threading
    from .report import SIGNAL_EXITS, error_line
    read, write = os.pipe()
    os.set_blocking(write, False)  # (as set_wakeup_fd asks: a full pipe must not block the handler)
    try:
        previous = signal.set_wakeup_fd(write)
    except ValueError:  # not the main thread (train as a library): its host handles signals its own way
        os.close(read)
        os.close(write)
        yield
        return
    waiting = threading.Event()
    waiting.set()

    def watch():
        while (number := os.read(read, 1)) and waiting.is_set():
            if number[0] in SIGNAL_EXITS:
                line, code = SIGNAL_EXITS[number[0]]
                error_line(line)
                os._exit(code)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        waiting.clear()
        signal.set_wakeup_fd(previous)
        os.close(write)  # (the watcher's read then ends)
        watcher.join()
        os.close(read)


def peer_lost(e: RuntimeError) -> bool:
    """Whether a collective failed because another rank is gone (torch's DistError, which NCCL's failures are, or
    gloo's plain RuntimeError of a closed connection): not a bug of this rank's."""
    import torch.distributed as dist
    return isinstance(e, getattr(dist, "DistError", ())) or any(
        words in str(e) for words in ("Connection closed by peer", "Connection reset by peer"))


class RankLost(RefsrError):
    """A collective failed because another rank is gone. The process group is then broken: the command ends this
    process at once after its line (at the interpreter's exit, gloo's threads aborted it, exit -6 for 2)."""


def lost_rank_line(e: RuntimeError, state_path: Path) -> str:
    """What a rank whose peer is gone says: gloo's first sentence, without its source file ("Connection closed by
    peer [127.0.0.1]:3492"), and whether there is a checkpoint to resume, as a signal's line says."""
    reason = re.sub(r"^\[[^\]]*\]\s*", "", (str(e).splitlines() or [""])[0]).split(". ")[0][:120]
    kept = ("; the last checkpoint is kept, continue with --resume" if state_path.is_file() else
            " before the run's first checkpoint: nothing to resume")
    return f"another rank of this run stopped or cannot be reached ({reason}){kept}"


class Diverged(RefsrError):
    """A step whose loss, or whose weights after it, are not finite numbers; run() says what is kept."""

    def __init__(self, step: int, what: str):
        super().__init__(what)
        self.step = step


def diverged_line(opt: TrainOptions, e: Diverged, saved: int | None) -> str:
    """What a run that diverged at step `e.step` says, its last checkpoint made at step `saved` (None: none): what
    it keeps, and what to change (a --resume takes this run's options, its learning rate too)."""
    if saved is None and e.step == 0:  # no step taken: not the learning rate, but what the run started from
        start = ", ".join(map(str, opt.init)) if opt.init else "a fresh model" if opt.stage == "trunk" else (
            f"the shipped x{opt.scale} weights")
        return (f"{e}, at the run's first step, before any checkpoint: the weights it starts from ({start}) or the "
                "data give numbers that are not finite")
    if saved is None:
        return f"{e}, before the run's first checkpoint: lower --learning-rate or check the data"
    if saved == e.step:  # the checkpoint holds the very weights whose loss was not finite
        return (f"{e}, with the weights the last checkpoint (step {saved}) holds, which cannot be trained on: start "
                "again (--overwrite) with a lower --learning-rate, or check the data")
    return (f"{e}; the last checkpoint (step {saved}) is kept: to go on at a lower --learning-rate, give it to "
            "--init with another --out, or check the data")


def descend(loss, optimizer, module, world: int, step: int, scaler=None) -> None:
    """One optimizer step of `module` on `loss`, with the gradients averaged over the ranks (through the AMP loss
    scaler, when given: a no-op off CUDA); a non-finite loss stops the run."""
    if not torch.isfinite(loss):
        raise Diverged(step, f"step {step}: the loss is {loss.item()}")
    optimizer.zero_grad(set_to_none=True)
    (scaler.scale(loss) if scaler else loss).backward()
    average_gradients(module, world)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


def average_gradients(module, world: int) -> None:
    """Under torchrun: every rank's gradients replaced by their mean over the ranks, so that every rank takes the
    same step (data parallelism without a wrapper around the model: a stage's step calls several of its methods)."""
    if world == 1:
        return
    import torch.distributed as dist
    for p in module.parameters():
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= world


class RunLog:
    """Rank 0's bookkeeping after each step: a row of log.jsonl every log_every steps, validation every val_every,
    the save every save_every, and the progress callback."""

    def __init__(self, opt: TrainOptions, start: int, progress):
        self.opt, self.start, self.progress = opt, start, progress
        self.file = open_log(opt.out / "log.jsonl", start, opt.resume)
        self.started = time.time()

    def after(self, step: int, measures: dict, notes: list, learning_rate: float, validate, save) -> None:
        """After step `step` (1-based), with its `measures` (the loss terms and the `notes` logged beside them)."""
        opt = self.opt
        measures = {k: v.item() if torch.is_tensor(v) else v for k, v in measures.items()}
        row = {}
        if step % opt.log_every == 0 or step == opt.steps:
            row = {"step": step, **measures, "learning_rate": learning_rate,
                   "seconds": round(time.time() - self.started, 1)}
        if validate is not None and (step % opt.val_every == 0 or step == opt.steps):
            row = {"step": step, **row, **validate()}
        if row:
            if identity(Path(self.file.name)) != identity_of(self.file):  # replaced or removed since it was opened
                raise RefsrError(f"{self.file.name} changed while this run trained (another process replaced or "
                                 f"removed it); it is kept and the run stops at step {step}: the last checkpoint is "
                                 "kept, move the log away and --resume")
            try:
                self.file.write(json.dumps(row) + "\n")
                self.file.flush()
            except OSError as e:  # a full disk: a row cut short is dropped by the next --resume (open_log)
                raise RefsrError(f"cannot write {self.file.name} ({e.strerror or e}); the last checkpoint is "
                                 "kept") from None
        if step % opt.save_every == 0 or step == opt.steps:
            save()
        if self.progress is not None:
            losses = {k: v for k, v in measures.items() if k not in notes and k != "loss"}
            self.progress(step, opt.steps, losses | {k: v for k, v in row.items() if k.startswith("val_")},
                          (step - self.start) / max(time.time() - self.started, 1e-9))

    def close(self) -> None:
        try:
            self.file.close()
        except OSError:  # a row after() could not write (a full disk, reported there) is tried again here: dropped
            pass


def set_learning_rate(optimizers, opt: TrainOptions, step: int) -> None:
    """Cosine decay to a tenth over the whole run, so that a resumed run lands on the same schedule."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = (opt.learning_rate * group.get("lr_scale", 1.0)
                           * (0.55 + 0.45 * math.cos(math.pi * step / opt.steps)))


def open_log(path: Path, step: int, resumed: bool):
    """log.jsonl for appending; on resume, the rows after the checkpoint's step are dropped (they are redone), and so
    is a row cut short by a kill or a full disk."""
    if path.is_symlink():  # written through, it would append to whatever it points at (a data folder's file)
        raise RefsrError(f"{path}: a link, where this run writes its log; remove it, or give another --out")
    if path.exists() and not path.is_file():  # a FIFO would be waited on forever
        raise RefsrError(f"{path}: not a regular file")
    if resumed and path.exists():
        def kept(row: str) -> bool:
            try:
                return json.loads(row)["step"] <= step
            except (ValueError, KeyError, TypeError, RecursionError):  # a row cut short, or no row of ours
                return False
        rows = [r for r in path.read_text(errors="replace").splitlines() if r.strip() and kept(r)]
        try:
            with atomic_path(path) as tmp:
                Path(tmp).write_text("".join(r + "\n" for r in rows))
        except OSError as e:  # a full disk: the log as it was, and the checkpoint to resume from, are kept
            raise RefsrError(f"cannot write {path} ({e.strerror or e}); it is kept as it was, and so is the last "
                             "checkpoint") from None
    return open(path, "a")


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


def save_training_state(path, stage, step: int, optimizer, scaler, recipe: dict) -> None:
    """The trained module of a training stage, its optimizer, the loss scaler and the step (and its critic) in one
    file, so that they can never be from different steps."""
    tensors = {f"module.{k}": v for k, v in stage.trained_state().items()}
    tensors.update(_optimizer_tensors("optimizer", optimizer))
    meta = {"format": STATE_FORMAT, "stage": stage.name, "step": str(step), "config": stage.config.to_json(),
            "param_groups": json.dumps(optimizer.state_dict()["param_groups"]),
            "scaler": json.dumps(scaler.state_dict()), "recipe": json.dumps(recipe)}
    if stage.critic is not None:
        tensors.update({f"disc.{k}": v for k, v in stage.critic.module.state_dict().items()})
        tensors.update(_optimizer_tensors("disc_optimizer", stage.critic.optimizer))
        meta["disc_param_groups"] = json.dumps(stage.critic.optimizer.state_dict()["param_groups"])
    bad = not_finite(tensors)
    if bad is not None:  # a step that diverged, in the weights or the optimizer's moments: the last save stays
        raise Diverged(step, f"step {step}: the training state is no longer finite numbers ({bad}); nothing was saved")
    atomic_save(tensors, path, meta)


def load_training_state(path, recipe: dict) -> dict:
    """What save_training_state wrote: {meta, config, step, module, optimizer, scaler[, disc, disc_optimizer]};
    refused unless it was written by a run of the same `recipe`."""
    meta = read_metadata(path)
    if meta.get("format") != STATE_FORMAT:
        raise RefsrError(f"--resume: {path} is not a training state this refsr reads")
    try:
        trained_with = json.loads(meta["recipe"])
        if trained_with != recipe:  # each flag that differs, as it was and as it is now
            shown = lambda v: "none" if v is None else (t := json.dumps(v))[:40] + ("..." if len(t) > 40 else "")
            changed = [f"--{k.replace('_', '-')} {shown(trained_with.get(k))}, not {shown(recipe.get(k))}"
                       for k in sorted(set(recipe) | set(trained_with)) if trained_with.get(k) != recipe.get(k)]
            raise RefsrError(f"--resume: {path} was trained with other options ({'; '.join(changed)}); resume with "
                             "the same options")
        check_state_header(path, stored_config(meta, path))
        tensors = read_weights(path)
        part = lambda prefix: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not re.fullmatch(r"[0-9]{1,12}", meta["step"]):  # ASCII digits: int() reads other scripts' too
            raise ValueError(f"step {meta['step']!r} is not a step")
        state = {"meta": meta, "config": stored_config(meta, path), "step": int(meta["step"]),
                 "module": part("module."), "scaler": finite_numbers(json.loads(meta["scaler"]), 2.0 ** 64),
                 "optimizer": _optimizer_state(tensors, "optimizer", finite_numbers(json.loads(meta["param_groups"])))}
        if "disc_param_groups" in meta:
            state["disc"] = part("disc.")
            state["disc_optimizer"] = _optimizer_state(tensors, "disc_optimizer",
                                                       finite_numbers(json.loads(meta["disc_param_groups"])))
    except (KeyError, ValueError, TypeError, AttributeError, RecursionError) as e:
        raise RefsrError(f"--resume: {path} is a damaged training state ({type(e).__name__}: {e})") from None
    return state


STATE_PARTS = ("module.", "optimizer.", "disc.", "disc_optimizer.")  # the tensors save_training_state writes


def check_state_header(path, config) -> None:
    """Refuse, from its header alone (before any data is read), a training state holding tensors that
    save_training_state never writes, or more numbers than a run of `config` has (its networks and the critic,
    with Adam's two moments of each): an extra tensor of gigabytes was read whole, then ignored."""
    shapes = header_shapes(path)
    odd = next((name for name in shapes if not name.startswith(STATE_PARTS)), None)
    if odd is not None:
        raise RefsrError(f"--resume: {path} holds {odd}, which a training state of refsr never does")
    with torch.device("meta"):  # (nothing allocated)
        networks = (RefVAE(config), FidelityTrunk(config.channels, config.lr_blocks, config.up_channels, SCALES),
                    PatchDiscriminator())
        most = 3 * sum(p.numel() for network in networks for p in network.parameters()) + len(shapes)
    declared = sum(math.prod(shape) for shape in shapes.values())
    if declared > most:
        raise RefsrError(f"--resume: {path} declares {declared:,} numbers, more than a training state of its config "
                         f"holds ({most:,} at most)")


def finite_numbers(value, largest: float = 1e6):
    """`value` (JSON: an optimizer's settings, a loss scaler's), if every number in it is finite and of at most
    `largest` in size (a learning rate, betas, eps, a loss scale of 2^16); else ValueError."""
    if isinstance(value, dict):
        for item in value.values():
            finite_numbers(item, largest)
    elif isinstance(value, list):
        for item in value:
            finite_numbers(item, largest)
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and not abs(value) <= largest:
        raise ValueError(f"{value!r} is not a setting an optimizer or loss scaler takes")
    return value
