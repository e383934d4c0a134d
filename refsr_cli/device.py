"""Where a run goes: the device of --device, and this process's share of the inputs when a launcher (torchrun,
SLURM) started several copies of refsr."""
import os
import re

from .errors import RefsrError, shown
from .options import MAX_COPIES


def pick_device(name: str):
    """--device: auto picks CUDA, then MPS, then the CPU."""
    import torch
    if name == "cuda" and not torch.cuda.is_available():
        raise RefsrError("--device cuda: no CUDA device is available")
    if name == "mps" and not torch.backends.mps.is_available():
        raise RefsrError("--device mps: MPS is not available")
    if name not in ("auto", "cuda"):
        return torch.device(name)
    if torch.cuda.is_available():
        # One GPU per process under a launcher (torchrun, SLURM): the local rank's.
        local = environment_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else environment_int("SLURM_LOCALID")
        return torch.device("cuda", local % torch.cuda.device_count()) if local is not None else torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def usable_device(device):
    """`device` (a torch.device or its name) when this torch can run refsr there: the CPU, an MPS device, or a CUDA
    device that exists; else a RefsrError (the Python API's check; the commands' --device is pick_device's)."""
    import torch
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError, OverflowError):  # (an index past int64: "Overflow when unpacking")
        raise RefsrError(f"device={device!r}: not a torch device (give 'cpu', 'cuda', 'cuda:1' or 'mps')") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise RefsrError(f"device={str(device)!r}: no such CUDA device here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise RefsrError("device='mps': MPS is not available")
    if device.type not in ("cpu", "cuda", "mps"):
        raise RefsrError(f"device={str(device)!r}: refsr runs on 'cpu', 'cuda' or 'mps'")
    return device


def environment_int(name: str, minimum: int = 0) -> int | None:
    """The integer value of environment variable `name` (None when unset); a value that is not an integer of at
    least `minimum` stops the run with a line naming the variable."""
    value = os.environ.get(name)
    if value is None:
        return None
    if not re.fullmatch(r"-?[0-9]{1,20}", value.strip()):  # ASCII digits (int() also reads other scripts'), and
        # not thousands of them (int() refuses 4300 with a ValueError that names no variable)
        raise RefsrError(f"{name}='{shown(value)}': not an integer (set by a launcher such as torchrun or srun?)")
    number = int(value.strip())
    if number < minimum:
        raise RefsrError(f"{name}={value!r}: must be at least {minimum}")
    if number > MAX_COPIES:
        raise RefsrError(f"{name}={value!r}: more than the {MAX_COPIES} copies refsr runs")
    return number


def launcher() -> tuple | None:
    """(rank, size, the rank's variable) when a launcher started copies of refsr (torchrun's RANK/WORLD_SIZE, srun's
    SLURM_PROCID/SLURM_STEP_NUM_TASKS, torchrun's first), else None. The step's size, not the job's SLURM_NTASKS: a
    batch script or an salloc shell has SLURM_PROCID=0 and SLURM_NTASKS=N with no srun, and did a share of N alone.
    Values that cannot describe a share (not integers, a size below 1, a rank outside 0..N-1, a rank without a
    size) stop the run: a wrong share would silently write the wrong files."""
    for rank_name, world_name in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS")):
        if rank_name == "SLURM_PROCID" and world_name not in os.environ:  # a job's shell, not a step srun started
            continue
        rank, world = environment_int(rank_name), environment_int(world_name, minimum=1)
        if world is None and rank is None:
            continue
        if world is None:
            raise RefsrError(f"{rank_name} is set but {world_name} is not: set both, or neither")
        if rank is None:
            if world == 1:
                continue
            raise RefsrError(f"{world_name}={world} is set but {rank_name} is not: set both, or neither")
        if rank >= world:
            raise RefsrError(f"{rank_name}={rank} is not below {world_name}={world}")
        return rank, world, rank_name
    return None


def launcher_shard() -> tuple | None:
    """(K, N): this copy's share of the inputs when a launcher started N > 1 copies of refsr, else None."""
    found = launcher()
    return found[:2] if found is not None and found[1] > 1 else None
