"""The Hub download path of --weights, end to end through huggingface_hub, against a loopback fake of the Hub.

No test here may reach the network: HF_ENDPOINT points at tests/hub_server.py on 127.0.0.1, and a guard fails any
test that tries to resolve or connect to anything but loopback.
"""
import hashlib
import socket
import time

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file

from conftest import one_error_line, write_png
from hub_server import FakeHub
from huggingface_hub import constants as hf_constants
from huggingface_hub import file_download as hf_file_download
from huggingface_hub.utils import _http as hf_http
from refsr_cli.checkpoint import build_model, load_weights, resolve_weights, save_model
from refsr_cli.cli import main
from refsr_cli.errors import RefsrError
from refsr_cli.model import RefVAEConfig

REPO = "owner/repo"
LOOPBACK = {"127.0.0.1", "::1", "localhost"}


def tiny_checkpoint_bytes(path, seed):
    torch.manual_seed(seed)  # a different seed gives different weights, so main and v1 differ
    model = build_model(RefVAEConfig(scale=2, channels=8, lr_blocks=1, fuse_blocks=1, up_channels=(8,), z_dim=8,
                                     head_channels=8, ref_size=32, cond_grid=2, cond_period=4))
    save_model(model, path)
    return path.read_bytes()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The bytes of two real tiny x2 checkpoints, built once for the module: (main's, v1's)."""
    folder = tmp_path_factory.mktemp("served")
    return tiny_checkpoint_bytes(folder / "main.safetensors", 0), tiny_checkpoint_bytes(folder / "v1.safetensors", 1)


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """Fail the test if anything resolves or connects to a non-loopback address (huggingface.co included).

    The refused attempt raises OSError, which huggingface_hub would swallow into a "cannot reach the Hub" error, so
    the attempts are also recorded and checked after the test."""
    attempts = []
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect

    def getaddrinfo(host, *args, **kwargs):
        if str(host) not in LOOPBACK:
            attempts.append(host)
            raise OSError(f"test guard: no DNS lookup of {host!r}")
        return real_getaddrinfo(host, *args, **kwargs)

    def connect(self, address):
        if isinstance(address, tuple) and address[0] not in LOOPBACK:
            attempts.append(address)
            raise OSError(f"test guard: no connection to {address!r}")
        return real_connect(self, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    yield
    assert attempts == [], f"the test tried to reach the network: {attempts}"


class _NoSleep:
    """The `time` module without waiting: huggingface_hub backs off 1+2+4+8+8 s before giving up on a dead host."""

    def sleep(self, seconds):
        pass

    def __getattr__(self, name):
        import time
        return getattr(time, name)


def point_hub_at(monkeypatch, endpoint):
    """HF_ENDPOINT, both in the environment and where huggingface_hub copied it at import time."""
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(hf_constants, "ENDPOINT", endpoint)
    # hf_hub_url formats this template (built from ENDPOINT at import) when no endpoint= is passed, as here.
    monkeypatch.setattr(hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")


def set_offline(monkeypatch, offline):
    """HF_HUB_OFFLINE, in the environment and in the constant read by huggingface_hub (and download_from_hub)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", offline)


@pytest.fixture
def hub(tmp_path, monkeypatch, checkpoints):
    """A started fake Hub serving owner/repo (main: LFS files, v1: a regular file), and a fresh HF cache per test."""
    main_bytes, v1_bytes = checkpoints
    fake = FakeHub()
    fake.add_revision(REPO, "main", {"tiny.safetensors": main_bytes, "refsr-x2.safetensors": main_bytes})
    fake.add_revision(REPO, "v1", {"tiny.safetensors": v1_bytes}, lfs=False)
    fake.start()

    point_hub_at(monkeypatch, fake.url)
    set_offline(monkeypatch, False)
    home = tmp_path / "hf-home"
    cache = home / "hub"
    for name, value in {"HF_HOME": home, "HF_HUB_CACHE": cache, "HUGGINGFACE_HUB_CACHE": cache,
                        "HF_XET_CACHE": home / "xet", "HF_ASSETS_CACHE": home / "assets",
                        "HF_TOKEN_PATH": home / "token", "HF_STORED_TOKENS_PATH": home / "stored_tokens"}.items():
        monkeypatch.setenv(name, str(value))
        monkeypatch.setattr(hf_constants, name, str(value))
    # No token from the developer's environment or login may be sent, even to loopback.
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(hf_http, "time", _NoSleep())
    monkeypatch.setattr(hf_file_download, "time", _NoSleep())
    # huggingface_hub shares one HTTP client between calls: start and end each test without pooled connections.
    hf_http.close_session()
    fake.cache = cache
    yield fake
    hf_http.close_session()
    fake.stop()


def closed_port_url():
    """The URL of a loopback port that nothing listens on (bound, then closed: connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def assert_same_tensors(path, served_bytes):
    loaded = load_weights(path, 2).model.trainable_state_dict()
    served = load_safetensors_bytes(served_bytes)
    assert sorted(loaded) == sorted(served)
    for name, tensor in served.items():
        assert torch.equal(loaded[name], tensor), name


def hub_error(spec, scale=2):
    with pytest.raises(RefsrError) as info:
        resolve_weights(spec, scale)
    message = str(info.value)
    assert "\n" not in message, f"not one line: {message!r}"
    return message


def test_download_lands_in_the_cache_and_loads(hub, checkpoints):
    path = resolve_weights(f"{REPO}:tiny.safetensors", 2)
    assert path.is_relative_to(hub.cache), path
    assert path.name == "tiny.safetensors"
    assert path.read_bytes() == checkpoints[0]
    assert_same_tensors(path, checkpoints[0])
    # main is served the LFS way: HEAD on the Hub (302, not followed), then GET on the CDN.
    assert [(role, method) for role, method, _ in hub.requests] == [("hub", "HEAD"), ("cdn", "GET")]
    assert hub.requests[0][2] == f"/{REPO}/resolve/main/tiny.safetensors"


def test_cache_hit_downloads_nothing(hub, monkeypatch):
    first = resolve_weights(f"{REPO}:tiny.safetensors", 2)
    assert hub.count("GET") == 1

    # Online, a second resolve only asks the Hub which commit main is at (HEAD), and downloads nothing.
    assert resolve_weights(f"{REPO}:tiny.safetensors", 2) == first
    assert hub.count("GET") == 1 and hub.count("HEAD") == 2

    # Offline: the same file, and not a single request.
    set_offline(monkeypatch, True)
    seen = len(hub.requests)
    assert resolve_weights(f"{REPO}:tiny.safetensors", 2) == first
    assert len(hub.requests) == seen

    # And with the Hub gone: still the cached file, offline or not (online falls back to the cache).
    hub.stop()
    assert resolve_weights(f"{REPO}:tiny.safetensors", 2) == first
    set_offline(monkeypatch, False)
    assert resolve_weights(f"{REPO}:tiny.safetensors", 2) == first
    assert len(hub.requests) == seen


def test_revision_gets_that_revisions_file(hub, checkpoints):
    main_bytes, v1_bytes = checkpoints
    assert main_bytes != v1_bytes
    v1 = resolve_weights(f"{REPO}@v1:tiny.safetensors", 2)
    assert v1.read_bytes() == v1_bytes
    assert v1.parent.name == hub.commit(REPO, "v1")  # the snapshot folder is named after the commit
    assert_same_tensors(v1, v1_bytes)
    # v1 is a regular (non-LFS) file: HEAD and GET both on the Hub itself.
    assert [(role, method) for role, method, _ in hub.requests] == [("hub", "HEAD"), ("hub", "GET")]
    assert all(path == f"/{REPO}/resolve/v1/tiny.safetensors" for _, _, path in hub.requests)

    main = resolve_weights(f"{REPO}:tiny.safetensors", 2)
    assert main.read_bytes() == main_bytes and main != v1


def test_default_filename_follows_the_scale(hub, checkpoints):
    path = resolve_weights(REPO, 2)
    assert path.name == "refsr-x2.safetensors"
    assert hub.requests[0][2] == f"/{REPO}/resolve/main/refsr-x2.safetensors"
    assert_same_tensors(path, checkpoints[0])


def test_missing_file_repo_and_revision_are_named(hub):
    assert "no such file" in hub_error(f"{REPO}:nope.safetensors")
    assert "repository" in hub_error("owner/missing:tiny.safetensors")
    assert "revision" in hub_error(f"{REPO}@v9:tiny.safetensors")
    # Each one failed on its HEAD: nothing was downloaded.
    assert hub.count("GET") == 0


def test_invalid_repo_id_is_a_refsr_error(hub):
    # Matches owner/repo, but the Hub's own rules forbid ".." in a repo id: huggingface_hub refuses it itself.
    assert "owner/re..po" in hub_error("owner/re..po:tiny.safetensors")
    # A file name that would climb out of the cache folder: refused before any request too.
    assert "not a valid Hub reference" in hub_error(f"{REPO}:../evil.safetensors")
    assert hub.requests == []


def test_offline_with_empty_cache_says_offline(hub, monkeypatch):
    set_offline(monkeypatch, True)
    message = hub_error(f"{REPO}:tiny.safetensors")
    assert "offline" in message and "cache" in message
    assert hub.requests == []


def test_unreachable_hub_suggests_offline_mode(hub, monkeypatch):
    point_hub_at(monkeypatch, closed_port_url())
    message = hub_error(f"{REPO}:tiny.safetensors")
    assert "cannot be reached" in message
    assert "HF_HUB_OFFLINE" in message and "cache" in message
    assert "no such file" not in message


@pytest.fixture
def silent_port_url():
    """The URL of a loopback port that takes connections and never answers (a Hub that does not respond)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.parametrize("where", ["closed port", "silent port"])
def test_an_unreachable_hub_fails_within_seconds(hub, monkeypatch, tmp_path, silent_port_url, where):
    # Real waiting, as a user waits: the hub fixture's no-sleep clock is put back, and no HF_HUB_ETAG_TIMEOUT of
    # the developer's environment applies. huggingface_hub alone retried for 26 s (refused) or minutes (silent).
    monkeypatch.setattr(hf_http, "time", time)
    monkeypatch.setattr(hf_file_download, "time", time)
    monkeypatch.setattr(hf_constants, "HF_HUB_ETAG_TIMEOUT", hf_constants.DEFAULT_ETAG_TIMEOUT)
    point_hub_at(monkeypatch, closed_port_url() if where == "closed port" else silent_port_url)
    image = write_png(tmp_path / "small.png", height=12, width=12)
    started = time.monotonic()
    result = CliRunner().invoke(main, ["upscale", str(image), "--scale", "2", "--weights", f"{REPO}:tiny.safetensors",
                                       "-o", str(tmp_path / "out"), "-q", "--device", "cpu"])
    elapsed = time.monotonic() - started
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("refsr: error:") and "cannot be reached" in lines[0], result.stderr
    assert elapsed < 8, f"{where}: {elapsed:.1f} s before the error"


def test_an_unreachable_hub_still_gives_the_cached_file_quickly(hub, monkeypatch, silent_port_url):
    monkeypatch.setattr(hf_http, "time", time)
    monkeypatch.setattr(hf_file_download, "time", time)
    cached = resolve_weights(f"{REPO}:tiny.safetensors", 2)
    point_hub_at(monkeypatch, silent_port_url)
    started = time.monotonic()
    assert resolve_weights(f"{REPO}:tiny.safetensors", 2) == cached
    assert time.monotonic() - started < 8


def test_download_cut_midway_is_a_refsr_error(hub):
    hub.cut_downloads = True
    message = hub_error(f"{REPO}:tiny.safetensors")
    assert "download failed" in message
    assert hub.count("GET") > 1  # huggingface_hub retried before giving up
    # Nothing half-downloaded is left where the next run would take it for the checkpoint.
    assert not list(hub.cache.rglob("tiny.safetensors"))


def test_a_download_cut_midway_is_one_line_on_stderr(hub, tmp_path):
    import subprocess
    import sys
    hub.cut_downloads = True  # huggingface_hub resumes it five times, logging each try
    image = write_png(tmp_path / "small.png", height=12, width=12)
    result = subprocess.run([sys.executable, "-m", "refsr_cli", "upscale", str(image), "--scale", "2", "--weights",
                             f"{REPO}:tiny.safetensors", "-o", str(tmp_path / "out"), "-q", "--device", "cpu"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("refsr: error: "), result.stderr
    assert "download failed" in result.stderr


def test_huggingface_hubs_warnings_are_refsrs_one_line(hub, tmp_path, monkeypatch, capsys):
    import warnings
    import huggingface_hub
    real = huggingface_hub.hf_hub_download

    def short_of_disk(*args, **kwargs):  # as huggingface_hub warns when the cache's disk is nearly full
        warnings.warn("Not enough free disk space to download the file.\nThe target location only has 1 MB.")
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", short_of_disk)
    resolve_weights(f"{REPO}:tiny.safetensors", 2)
    err = capsys.readouterr().err
    assert err.startswith("refsr: warning: ") and err.count("\n") == 1 and "free disk space" in err, err


def test_a_revision_git_could_not_name_is_refused_without_a_request(hub):
    message = hub_error(f"{REPO}@..:tiny.safetensors")
    assert "not a revision name" in message
    assert hub.requests == []


def test_download_http_error_is_one_line(hub):
    # The Hub sends the client to the CDN, which has lost the file: huggingface_hub's error spans several lines.
    hub.blobs.clear()
    message = hub_error(f"{REPO}:tiny.safetensors")
    assert "download failed" in message and "404" in message


def test_cli_upscales_with_hub_weights(hub, tmp_path):
    image = write_png(tmp_path / "small.png", height=12, width=12)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["upscale", str(image), "--scale", "2", "--weights", f"{REPO}:tiny.safetensors",
                                       "-o", str(out), "-q", "--tile-pad", "4", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    written = list(out.glob("*.png"))
    assert len(written) == 1
    with Image.open(written[0]) as png:
        assert png.size == (24, 24)


def test_the_redo_of_hub_weights_loads_the_commit_it_used(hub, tmp_path, checkpoints, monkeypatch):
    import json
    import shlex
    import numpy as np
    image = write_png(tmp_path / "small.png", height=12, width=12)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["upscale", "small.png", "--scale", "2", "--weights", f"{REPO}:tiny.safetensors",
                                       "-o", "out", "-q", "--tile-pad", "4", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    used = hub.commit(REPO, "main")
    record = json.loads(CliRunner().invoke(main, ["info", "--json", "out/small_x2.png"]).stdout)
    assert record["weights"] == f"{REPO}@{used}:tiny.safetensors"
    main_bytes, v1_bytes = checkpoints
    hub.add_revision(REPO, "main", {"tiny.safetensors": v1_bytes})  # the repository moves on: other weights
    words = shlex.split(record["redo"])
    assert words[0] == "refsr"
    (tmp_path / "redo").mkdir()
    result = CliRunner().invoke(main, [*words[1:], "-o", "redo"])
    assert result.exit_code == 0, result.output
    first, again = (np.asarray(Image.open(p)) for p in ("out/small_x2.png", "redo/small_x2.png"))
    assert np.array_equal(first, again)
    assert image.exists()


@pytest.mark.parametrize("kind", ["relative", "linked"])
def test_a_relative_or_linked_cache_still_pins_the_commit(hub, tmp_path, monkeypatch, kind):
    """huggingface_hub resolves the cache folder; the pin compared the path it gave with the cache as named."""
    import json
    (tmp_path / "real").mkdir()
    if kind == "linked":
        (tmp_path / "link").symlink_to(tmp_path / "real")
    cache = "real/cache" if kind == "relative" else str(tmp_path / "link" / "cache")
    monkeypatch.setenv("HF_HUB_CACHE", cache)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", cache)
    write_png(tmp_path / "small.png", height=12, width=12)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["upscale", "small.png", "--scale", "2", "--weights", f"{REPO}:tiny.safetensors",
                                       "-o", "out", "-q", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    record = json.loads(CliRunner().invoke(main, ["info", "--json", "out/small_x2.png"]).stdout)
    assert record["weights"] == f"{REPO}@{hub.commit(REPO, 'main')}:tiny.safetensors"


def test_the_hubs_own_error_log_is_not_a_second_line(hub, tmp_path):
    """A cache where huggingface_hub cannot note a missing file: it logged an error ("Could not cache non-existence
    of file") before refsr's one line."""
    import os
    import subprocess
    import sys
    marker = hub.cache / "models--owner--repo" / ".no_exist"
    marker.parent.mkdir(parents=True)
    marker.touch()  # a file where it makes a folder
    # In a process of its own: its log goes to the process's stderr, which CliRunner does not capture.
    done = subprocess.run([sys.executable, "-m", "refsr_cli", "upscale", str(write_png(tmp_path / "small.png", 12, 12)),
                           "--scale", "2", "--weights", f"{REPO}:missing.safetensors", "-o", str(tmp_path / "out")],
                          env=os.environ | {"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(hub.cache)},
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "no such file in that Hub repository" in done.stderr, done.stderr


def test_a_cache_inside_a_folder_shaped_like_a_snapshot_still_pins_the_commit(hub, tmp_path, monkeypatch):
    """The pin is read relative to HF_HUB_CACHE: a cache that itself lies under models--owner--repo/snapshots/X/
    (an odd HF_HOME) named X as the commit, and a redo that does not exist."""
    import json
    cache = tmp_path / "models--owner--repo" / "snapshots" / "notacommit" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    write_png(tmp_path / "small.png", height=12, width=12)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["upscale", "small.png", "--scale", "2", "--weights", f"{REPO}:tiny.safetensors",
                                       "-o", "out", "-q", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert next(cache.glob("models--owner--repo/snapshots/*/tiny.safetensors"))  # downloaded there
    record = json.loads(CliRunner().invoke(main, ["info", "--json", "out/small_x2.png"]).stdout)
    assert record["weights"] == f"{REPO}@{hub.commit(REPO, 'main')}:tiny.safetensors"


def test_eval_json_pins_hub_weights_to_their_commit(hub, tmp_path):
    """eval --json recorded the reference as typed (owner/repo:FILE), which names other weights once the
    repository moves on; the outputs' records pin the commit."""
    import json
    hr = tmp_path / "hr"
    hr.mkdir()
    write_png(hr / "a.png", height=32, width=32)
    result = CliRunner().invoke(main, ["eval", str(hr), "--scale", "2", "--weights", f"{REPO}:tiny.safetensors",
                                       "--json", str(tmp_path / "e.json"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    recorded = json.loads((tmp_path / "e.json").read_text())["weights"]
    assert recorded == f"{REPO}@{hub.commit(REPO, 'main')}:tiny.safetensors"


def test_cli_missing_repo_is_one_line_error(hub, tmp_path):
    image = write_png(tmp_path / "small.png", height=12, width=12)
    result = CliRunner().invoke(main, ["upscale", str(image), "--scale", "2", "--weights", "owner/missing",
                                       "-o", str(tmp_path / "out"), "-q", "--tile-pad", "4", "--device", "cpu"])
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), result.exception  # an exit, not an uncaught exception
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("refsr: error:"), result.stderr
    assert "repository" in lines[0]
    assert "Traceback" not in result.output


# --- refsr push: uploads through huggingface_hub to the same fake Hub ---------------------------------------------

def tiny_x4_checkpoint(path):
    torch.manual_seed(4)
    model = build_model(RefVAEConfig(scale=4, channels=8, lr_blocks=1, fuse_blocks=1, up_channels=(8, 8), z_dim=8,
                                     head_channels=8, ref_size=32, cond_grid=2, cond_period=4))
    save_model(model, path, stage="trunk", step=1234)
    return path


def push(*args):
    return CliRunner().invoke(main, ["push", *map(str, args)])


def test_push_creates_the_repo_and_what_it_pushed_loads_back(hub, tmp_path, monkeypatch, checkpoints):
    monkeypatch.setenv("HF_TOKEN", "hf_loopback_test_token")
    x2 = tmp_path / "mine-x2.safetensors"
    x2.write_bytes(checkpoints[0])
    x4 = tiny_x4_checkpoint(tmp_path / "run" / "last.safetensors")
    result = push(x2, x4, "me/upscaler")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().startswith(f"{hub.url}/me/upscaler/commit/")
    files = hub.files("me/upscaler")
    # Stored under the names --weights OWNER/REPO looks for, byte for byte.
    assert files["refsr-x2.safetensors"] == checkpoints[0] and files["refsr-x4.safetensors"] == x4.read_bytes()
    card = files["README.md"].decode()
    assert card.startswith("---\nlibrary_name: refsr")
    assert hashlib.sha256(x4.read_bytes()).hexdigest() in card and "texture branch untrained" in card and "1234" in card
    assert "--weights me/upscaler" in card and "license" not in card  # no licence claimed for the user's weights
    # One commit for all three files: the new head of main is the commit the command printed.
    assert result.stdout.strip().endswith(hub.commit("me/upscaler", "main"))
    assert_same_tensors(resolve_weights("me/upscaler", 2), checkpoints[0])
    model = load_weights("me/upscaler", scale=4).model
    reference = load_weights(x4, 4).model
    for name, tensor in reference.trainable_state_dict().items():
        assert torch.equal(model.trainable_state_dict()[name], tensor)


def test_a_hub_reference_without_a_file_needs_a_scale(hub):
    with pytest.raises(RefsrError, match="name the scale"):
        load_weights(REPO)
    assert hub.count() == 0


def test_push_into_an_existing_repo_adds_a_commit(hub, tmp_path, monkeypatch, checkpoints):
    monkeypatch.setenv("HF_TOKEN", "hf_loopback_test_token")
    x4 = tiny_x4_checkpoint(tmp_path / "x4.safetensors")
    before = hub.commit(REPO, "main")
    result = push(x4, REPO, "--no-card", "-m", "x4 weights")
    assert result.exit_code == 0, result.output
    files = hub.files(REPO)
    assert files["refsr-x4.safetensors"] == x4.read_bytes() and "README.md" not in files
    assert files["tiny.safetensors"] == checkpoints[0]  # what was there stays
    assert hub.commit(REPO, "main") != before


def test_push_to_a_new_branch_creates_it_and_the_card_names_it(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_loopback_test_token")
    x4 = tiny_x4_checkpoint(tmp_path / "x4.safetensors")
    result = push(x4, REPO, "--revision", "v2", "--license", "cc-by-sa-4.0")
    assert result.exit_code == 0, result.output
    assert "refsr-x4.safetensors" not in hub.files(REPO, "main")
    card = hub.files(REPO, "v2")["README.md"].decode()
    assert f"--weights {REPO}@v2" in card and "license: cc-by-sa-4.0" in card
    assert resolve_weights(f"{REPO}@v2", 4).read_bytes() == x4.read_bytes()


def test_push_without_a_token_is_one_line_error(hub, tmp_path):
    x4 = tiny_x4_checkpoint(tmp_path / "x4.safetensors")
    result = push(x4, "me/upscaler")
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("refsr: error: me/upscaler") and "HF_TOKEN" in lines[0]
    assert "me/upscaler" not in hub.repos


@pytest.mark.parametrize("token", ["hf_caf\u00e9", "hf_a\x07b"])
def test_a_token_no_header_can_carry_is_refused_before_any_request(hub, tmp_path, monkeypatch, token):
    """Nothing was sent, so nothing could start: exit 2, not the 1 of an upload that failed."""
    monkeypatch.setenv("HF_TOKEN", token)
    x4 = tiny_x4_checkpoint(tmp_path / "x4.safetensors")
    result = push(x4, "me/upscaler")
    assert result.exit_code == 2, result.output
    one_error_line(result, "Hub token", "set it again")
    assert hub.count() == 0


def test_push_refuses_what_it_cannot_push_before_any_request(hub, tmp_path, monkeypatch, checkpoints):
    monkeypatch.setenv("HF_TOKEN", "hf_loopback_test_token")
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    x2 = tmp_path / "x2.safetensors"
    x2.write_bytes(checkpoints[0])
    twice = tmp_path / "again.safetensors"
    twice.write_bytes(checkpoints[1])
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00" * 40)
    (tmp_path / "folder.safetensors").mkdir()
    from test_bad_input import poisoned
    nan = poisoned(x2, tmp_path / "nan.safetensors")
    # Nothing could start, as the README's contract says: exit 2 (1 is for a push the Hub refused or that failed).
    for args, message in [((other, "me/upscaler"), "not a refsr checkpoint"),
                          ((x2, twice, "me/upscaler"), "push one per scale"),
                          ((tmp_path / "missing.safetensors", "me/upscaler"), "no such file"),
                          ((tmp_path / "corrupt.safetensors", "me/upscaler"), "not a readable safetensors"),
                          ((tmp_path / "folder.safetensors", "me/upscaler"), "folder.safetensors"),
                          ((nan, "me/upscaler"), "nan.safetensors: its weights are not all finite"),
                          ((x2, "me/upscaler@v2"), "not a Hub repository name"),
                          ((x2, "me"), "not a Hub repository name"),
                          ((x2, "owner/re..po"), "not a Hub repository name"),  # the Hub's own rules
                          ((x2, "me/upscaler.git"), "not a Hub repository name"),
                          ((x2, "me/upscaler", "--revision", "v2:x"), "--revision"),
                          ((x2, "me/upscaler", "--revision", ""), "--revision"),
                          *(((x2, "me/upscaler", "--revision", name), "--revision")  # git refuses these branches
                            for name in ("a..b", "x.lock", "a/", ".hidden", "a//b", "a/.b", "-x", "HEAD"))]:
        result = push(*args)
        assert result.exit_code == 2 and isinstance(result.exception, SystemExit), (args, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("refsr: error:") and message in lines[0], (args, result.stderr)
    assert hub.count() == 0


def test_push_prints_the_servers_commit_url_on_one_line(hub, tmp_path, monkeypatch):
    """The commit URL is the server's text, printed raw: an escape cleared the screen and a newline forged a second
    line ('refsr: error: fake')."""
    monkeypatch.setenv("HF_TOKEN", "hf_loopback_test_token")
    hub.commit_url_tail = "\x1b[2J\nrefsr: error: fake"
    result = push(tiny_x4_checkpoint(tmp_path / "x4.safetensors"), "me/upscaler")
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == 1 and "\x1b" not in result.stdout, repr(result.stdout)


def test_push_that_fails_at_the_hub_exits_1(hub, tmp_path, monkeypatch):
    """Once the first request is sent, a failure exits 1, as the README says (the repository may exist by then),
    here even though the connection was refused: refsr does not tell which requests reached the Hub."""
    monkeypatch.setenv("HF_TOKEN", "hf_loopback_test_token")
    x4 = tiny_x4_checkpoint(tmp_path / "x4.safetensors")
    point_hub_at(monkeypatch, closed_port_url())
    result = push(x4, "me/upscaler")
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("refsr: error: me/upscaler: upload failed"), result.stderr


def test_push_to_a_hub_that_does_not_answer_gives_up(hub, tmp_path, monkeypatch, silent_port_url):
    # huggingface_hub's HTTP client has no timeout of its own: a push to a silent Hub waited forever.
    from refsr_cli import hub as refsr_hub
    monkeypatch.setattr(refsr_hub, "PUSH_TIMEOUT", 1)
    monkeypatch.setenv("HF_TOKEN", "hf_loopback_test_token")
    x4 = tiny_x4_checkpoint(tmp_path / "x4.safetensors")
    point_hub_at(monkeypatch, silent_port_url)
    started = time.monotonic()
    result = push(x4, "me/upscaler")
    assert result.exit_code == 1 and "upload failed" in result.stderr, result.output
    assert time.monotonic() - started < 8


@pytest.mark.parametrize("variable, value", [("HF_ENDPOINT", "http://[::1"), ("HF_HUB_ETAG_TIMEOUT", "soon")])
def test_a_malformed_hub_setting_is_one_line(tmp_path, checkpoints, variable, value):
    """huggingface_hub reads its HF_* variables when imported, and a malformed one raised a ValueError there (a
    traceback). A fresh process: this one imported huggingface_hub long ago. Offline, so that nothing is reached."""
    import os
    import subprocess
    import sys
    image = write_png(tmp_path / "small.png", height=12, width=12)
    x2 = tmp_path / "x2.safetensors"
    x2.write_bytes(checkpoints[0])
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"), **{variable: value})
    for args, code in [(["upscale", image, "--scale", "2", "--weights", REPO, "-o", tmp_path / "out"], 2),
                       (["push", x2, "me/upscaler"], 2)]:
        done = subprocess.run([sys.executable, "-m", "refsr_cli", *map(str, args)], env=env, capture_output=True,
                              text=True, timeout=120)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == code and len(lines) == 1, done.stderr
        assert lines[0].startswith("refsr: error: huggingface_hub cannot start") and "HF_" in lines[0]


def test_a_token_file_that_cannot_be_read_is_named_and_a_hash_shaped_branch_refused(hub, tmp_path, monkeypatch):
    from refsr_cli.errors import RefsrError
    folder = tmp_path / "tokdir"
    folder.mkdir()
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(folder))
    with pytest.raises(RefsrError, match="cannot read the Hub token file .* HF_TOKEN_PATH names it"):
        resolve_weights(f"{REPO}:tiny.safetensors", 2)
    monkeypatch.setenv("HF_TOKEN", "hf_loopback_test_token")
    result = push(tiny_x4_checkpoint(tmp_path / "x4.safetensors"), REPO, "--revision", "a" * 40)
    assert result.exit_code == 2
    one_error_line(result, "named like a commit's hash")
    assert hub.count("POST") == 0


# --- sweep: a damaged cache copy, files the Hub would drop, refusals named, the Python push's arguments --------------

def blob_of(hub, data):
    """The cache's blob of an LFS file: named by the sha256 of its content."""
    return hub.cache / "models--owner--repo" / "blobs" / hashlib.sha256(data).hexdigest()


def test_a_damaged_cache_copy_is_refused_naming_it(hub, tmp_path, monkeypatch, checkpoints):
    """A blob whose bytes changed in the cache was loaded, exit 0, its record naming the commit's weights."""
    load_weights(f"{REPO}:tiny.safetensors", 2)
    blob = blob_of(hub, checkpoints[0])
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 1  # one bit of a weight: the file still loads
    blob.write_bytes(bytes(data))
    image = write_png(tmp_path / "small.png", height=12, width=12)
    result = CliRunner().invoke(main, ["upscale", str(image), "--scale", "2", "--weights", f"{REPO}:tiny.safetensors",
                                       "-o", str(tmp_path / "out"), "-q", "--device", "cpu"])
    assert result.exit_code == 2, result.output
    one_error_line(result, "damaged", str(blob), "remove it")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    set_offline(monkeypatch, True)  # the cache alone: the same refusal
    with pytest.raises(RefsrError, match="damaged"):
        load_weights(f"{REPO}:tiny.safetensors", 2)
    set_offline(monkeypatch, False)
    blob.unlink()  # as the line says: removed, it downloads again
    assert_same_tensors(resolve_weights(f"{REPO}:tiny.safetensors", 2), checkpoints[0])


def test_other_bytes_under_an_lfs_files_etag_are_refused(hub, checkpoints):
    """A server that sends other bytes than the sha256 it named (X-Linked-Etag): they were used as the file."""
    hub.blobs[hashlib.sha256(checkpoints[0]).hexdigest()] = checkpoints[1]
    message = hub_error(f"{REPO}:tiny.safetensors")
    assert "damaged" in message and str(blob_of(hub, checkpoints[0])) in message


def test_a_damaged_regular_files_blob_is_refused(hub, monkeypatch, checkpoints):
    """A regular (non-LFS) file's blob is named by its git sha1, which was not compared: other weights under v1's
    pin, online or offline."""
    from hub_server import git_sha1
    load_weights(f"{REPO}@v1:tiny.safetensors", 2)
    blob = hub.cache / "models--owner--repo" / "blobs" / git_sha1(checkpoints[1])
    blob.write_bytes(checkpoints[0])
    for offline in (False, True):
        set_offline(monkeypatch, offline)
        message = hub_error(f"{REPO}@v1:tiny.safetensors")
        assert "damaged" in message and "git sha1" in message and str(blob) in message, message


@pytest.mark.parametrize("where", ["blob", "snapshot"])
def test_a_cache_copy_linked_to_another_file_is_refused(hub, tmp_path, monkeypatch, checkpoints, where):
    """The check hashed only a file named by 64 hex digits: a blob, or a snapshot's link, pointed at another
    checkpoint loaded it as the commit's."""
    snapshot = resolve_weights(f"{REPO}:tiny.safetensors", 2)
    other = tmp_path / "other.safetensors"
    other.write_bytes(checkpoints[1])
    (blob_of(hub, checkpoints[0]) if where == "blob" else snapshot).unlink()
    (blob_of(hub, checkpoints[0]) if where == "blob" else snapshot).symlink_to(other)
    set_offline(monkeypatch, True)
    message = hub_error(f"{REPO}:tiny.safetensors")
    assert "not to one of the cache's blobs" in message and str(other) in message, message


@pytest.mark.parametrize("revision", ["main", "v1"])  # an LFS file, a regular one
def test_a_plain_cache_copy_is_compared_with_the_hubs_hash_online(hub, monkeypatch, checkpoints, revision):
    """Where the file system has no symbolic links, huggingface_hub keeps a plain copy in the snapshot (no blob):
    other bytes there were loaded, online too, though the Hub's answer named the right hash."""
    monkeypatch.setattr(hf_file_download, "are_symlinks_supported", lambda *args: False)
    spec = f"{REPO}@{revision}:tiny.safetensors"
    snapshot = resolve_weights(spec, 2)
    assert not snapshot.is_symlink()
    served = snapshot.read_bytes()
    snapshot.write_bytes(checkpoints[1] if revision == "main" else checkpoints[0])
    message = hub_error(spec)
    assert "damaged" in message and str(snapshot) in message, message
    snapshot.write_bytes(served)
    assert_same_tensors(resolve_weights(spec, 2), served)


@pytest.mark.parametrize("what", ["file", "folder"])
def test_a_snapshot_linked_to_another_commits_copy_is_refused(hub, monkeypatch, what):
    """main's snapshot file (or its whole snapshot folder) linked to v1's intact copy: loaded, and recorded as
    main's commit beside v1's sha256, online and offline."""
    import os
    main, v1 = (resolve_weights(f"{REPO}{rev}:tiny.safetensors", 2) for rev in ("", "@v1"))
    if what == "file":
        main.unlink()
        main.symlink_to(os.path.realpath(v1))
    else:
        for item in main.parent.iterdir():
            item.unlink()
        main.parent.rmdir()
        main.parent.symlink_to(v1.parent)
    message = hub_error(f"{REPO}:tiny.safetensors")
    assert ("the Hub names this commit's file" if what == "file" else "is a link") in message, message
    if what == "folder":  # offline too: a snapshot folder is never a link
        set_offline(monkeypatch, True)
        assert "is a link" in hub_error(f"{REPO}:tiny.safetensors")


def test_a_pinned_commits_copy_linked_to_another_commits_is_refused_online(hub, monkeypatch):
    """hf_hub_download returns a cached commit's hash without asking the Hub: the redo's pinned
    owner/repo@COMMIT:FILE loaded main's snapshot linked to v1's blob, exit 0, recorded as main's commit."""
    import os
    main, v1 = (resolve_weights(f"{REPO}{rev}:tiny.safetensors", 2) for rev in ("", "@v1"))
    pinned = f"{REPO}@{hub.commit(REPO, 'main')}:tiny.safetensors"
    assert resolve_weights(pinned, 2) == main
    main.unlink()
    main.symlink_to(os.path.realpath(v1))
    assert "the Hub names this commit's file" in hub_error(pinned)


def test_a_server_naming_another_commit_for_a_pinned_one_is_refused(hub, checkpoints):
    """A pinned owner/repo@C0 whose answers named commit C1 was filed and recorded under C1 beside C0's bytes:
    the redo then loaded other weights."""
    c0 = hub.commit(REPO, "main")
    hub.add_revision(REPO, "main", {"tiny.safetensors": checkpoints[1]})
    hub.repo_commit = hub.commit(REPO, "main")
    message = hub_error(f"{REPO}@{c0}:tiny.safetensors")
    assert f"commit {hub.repo_commit} for commit {c0}" in message and "not answering as the Hub does" in message


def test_two_threads_downloading_leave_huggingface_hubs_retries_as_they_were():
    """Two threads' saves and restores of file_download's retry globals interleaved: the bounds stayed for the
    rest of the process, and the host's own downloads lost their retries."""
    import threading
    from refsr_cli.hub import hub_fails_fast
    names = ("_DEFAULT_RETRY_ON_EXCEPTIONS", "_DEFAULT_RETRY_ON_STATUS_CODES", "_ETAG_RETRY_TIMEOUT")
    before = {name: getattr(hf_file_download, name) for name in names if hasattr(hf_file_download, name)}
    inside = threading.Event()

    def first():
        with hub_fails_fast():
            inside.set()
            time.sleep(0.3)  # the second thread asks meanwhile

    def second():
        inside.wait()
        with hub_fails_fast():
            time.sleep(0.6)  # and ends after the first

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert {name: getattr(hf_file_download, name) for name in before} == before


@pytest.mark.parametrize("header", ["ETag", "X-Repo-Commit"])
def test_an_answer_without_the_hubs_headers_is_the_servers_fault(hub, header):
    """A server that answered without an ETag or an X-Repo-Commit read "the Hub cannot be reached"."""
    hub.dropped_headers = {header, "X-Linked-Etag"} if header == "ETag" else {header}
    message = hub_error(f"{REPO}:tiny.safetensors")
    assert "not the Hub's" in message and "cannot be reached" not in message, message


@pytest.mark.parametrize("etag", ["../../../../other.safetensors", ""])
def test_an_etag_that_climbs_out_of_the_blobs_is_refused(hub, tmp_path, checkpoints, etag):
    """A server's X-Linked-Etag of ../../../../other.safetensors: huggingface_hub linked the snapshot to that local
    file, which was loaded and recorded as the commit's. An empty one linked it to blobs/ itself, and the line
    blamed the cache."""
    other = tmp_path / "other.safetensors"  # (blobs/../../../../ is tmp_path)
    other.write_bytes(checkpoints[1])
    hub.linked_etag = etag
    message = hub_error(f"{REPO}:tiny.safetensors")
    assert "not answering as the Hub does" in message or "not the Hub's" in message, message
    assert other.read_bytes() == checkpoints[1]


def test_push_refuses_a_license_with_no_card(hub, tmp_path, monkeypatch):
    """--no-card --license mit pushed without a word and without a licence anywhere."""
    from refsr_cli import hub as refsr_hub
    monkeypatch.setenv("HF_TOKEN", "hf_loopback_test_token")
    x4 = tiny_x4_checkpoint(tmp_path / "x4.safetensors")
    result = push(x4, "me/upscaler", "--no-card", "--license", "mit")
    assert result.exit_code == 2, result.output
    one_error_line(result, "--license", "--no-card")
    with pytest.raises(RefsrError, match="--no-card"):
        refsr_hub.push([x4], "me/upscaler", card=False, license="mit")
    assert hub.count("POST") == 0


def test_push_refuses_files_the_repositorys_gitignore_would_drop(hub, tmp_path, monkeypatch):
    """huggingface_hub leaves a file the preupload answer marks shouldIgnore out of the commit, silently: push
    printed a commit URL, and the card listed a file the repository does not hold."""
    from refsr_cli import hub as refsr_hub
    monkeypatch.setenv("HF_TOKEN", "hf_loopback_test_token")
    x4 = tiny_x4_checkpoint(tmp_path / "x4.safetensors")
    before = hub.commit(REPO, "main")
    for ignored in ("refsr-x4.safetensors", "README.md"):
        hub.ignored = {ignored}
        result = push(x4, REPO)
        assert result.exit_code == 1, result.output
        one_error_line(result, ignored, ".gitignore")
        with pytest.raises(refsr_hub.UploadFailed, match=f"{ignored}.*gitignore"):
            refsr_hub.push([x4], REPO)
    assert hub.commit(REPO, "main") == before
    assert not [path for _, _, path in hub.requests if "/commit/" in path]


@pytest.mark.parametrize("headers, words", [
    ({"X-Error-Code": "GatedRepo", "X-Error-Message": "Access to model owner/repo is restricted."},
     ("gated", "accept its terms", "token")),
    ({"X-Error-Message": "Access to this resource is disabled."}, ("disabled",)),
    ({"X-Error-Message": "Forbidden"}, ("the Hub refused", "403")),
])
def test_a_refusal_of_the_hub_is_named_as_one(hub, headers, words):
    """A gated repository read "no such Hub repository", a 403 "the Hub cannot be reached": it was reached."""
    hub.refusals[REPO] = (403, headers)
    message = hub_error(f"{REPO}:tiny.safetensors")
    assert all(word in message for word in words), message
    assert "cannot be reached" not in message and "no such" not in message, message


@pytest.mark.parametrize("action", ["create", "preupload", "commit"])
def test_an_upload_answer_that_is_not_json_is_the_servers_fault(hub, tmp_path, monkeypatch, action):
    monkeypatch.setenv("HF_TOKEN", "hf_loopback_test_token")
    hub.not_json = {action}
    result = push(tiny_x4_checkpoint(tmp_path / "x4.safetensors"), "me/upscaler")
    assert result.exit_code == 1, result.output
    one_error_line(result, "me/upscaler: upload failed", "not the Hub's")
    assert "valid Hub reference" not in result.stderr


def test_a_commit_header_that_climbs_out_of_the_cache_is_the_servers_fault(hub, tmp_path):
    hub.repo_commit = "../../../../../escape"
    message = hub_error(f"{REPO}:tiny.safetensors")
    assert "not the Hub's" in message and "valid Hub reference" not in message, message
    assert not list(tmp_path.rglob("escape"))


def test_the_python_push_checks_its_arguments_before_any_request(hub, tmp_path, monkeypatch):
    """Its docstring says everything is checked before the first request: a wrong type was a raw IndexError or
    TypeError, or created the repository (private="no" a private one) before failing."""
    from pathlib import Path
    from refsr_cli import hub as refsr_hub
    monkeypatch.setenv("HF_TOKEN", "hf_loopback_test_token")
    x4 = str(tiny_x4_checkpoint(tmp_path / "x4.safetensors"))
    for files, kwargs, named in [([], {}, "files"), (x4, {}, "files"), ([x4.encode()], {}, "files"),
                                 ([None], {}, "files"), (None, {}, "files"),
                                 ([x4], {"repo": b"me/q1"}, "repo"), ([x4], {"repo": Path("me/q1")}, "repo"),
                                 ([x4], {"revision": 5}, "revision"), ([x4], {"message": 5}, "message"),
                                 ([x4], {"license": 5}, "license"), ([x4], {"private": "no"}, "private"),
                                 ([x4], {"private": 1}, "private"), ([x4], {"card": "no"}, "card")]:
        arguments = {"repo": "me/q1"} | kwargs
        with pytest.raises(RefsrError) as info:
            refsr_hub.push(files, **arguments)
        assert not isinstance(info.value, refsr_hub.UploadFailed), (files, kwargs, info.value)
        assert str(info.value).startswith(named) and "\n" not in str(info.value), (files, kwargs, info.value)
    assert hub.count() == 0 and "me/q1" not in hub.repos
    # What the types allow still pushes: a tuple, a Path.
    assert refsr_hub.push((Path(x4),), "me/q1", private=False, message="x4").startswith(f"{hub.url}/me/q1/commit/")


def test_a_model_card_the_hub_refuses_is_named_as_refused(hub, tmp_path, monkeypatch):
    """The Hub's validate-yaml refusing the card (a licence id it does not know) read "not a valid Hub reference"."""
    monkeypatch.setenv("HF_TOKEN", "hf_loopback_test_token")
    hub.card_errors = ["\"license\" must be one of [apache-2.0, mit, ...]"]
    result = push(tiny_x4_checkpoint(tmp_path / "x4.safetensors"), REPO, "--license", "my-own")
    assert result.exit_code == 1, result.output
    one_error_line(result, "refused the model card's metadata", "\"license\" must be one of", "--license")
    assert not [path for _, _, path in hub.requests if "/commit/" in path]


# --- sweep 26b ------------------------------------------------------------------------------------------------------

def test_a_file_reference_ending_in_a_dot_is_refused_before_it_becomes_a_folder_in_the_cache(hub, checkpoints):
    """'FILE/.' passed the folder check (PurePosixPath reads it as FILE): huggingface_hub made FILE a folder in the
    snapshot, and every later load of the right reference was refused as a damaged cache."""
    for spec in (f"{REPO}:tiny.safetensors/.", f"{REPO}:tiny.safetensors/..", f"{REPO}:sub/."):
        assert "is not a file name in the repository" in hub_error(spec), spec
    assert hub.count() == 0
    assert resolve_weights(f"{REPO}:tiny.safetensors", 2).read_bytes() == checkpoints[0]


def test_a_download_cut_midway_leaves_the_cached_commit_usable_offline(hub, checkpoints, monkeypatch):
    """huggingface_hub moves refs/main to the new commit before downloading its file: a download of it cut midway
    (a dropped connection, Ctrl-C) left the commit before, cached whole, unreachable offline, where the error's
    advice was HF_HUB_OFFLINE=1."""
    cached = resolve_weights(f"{REPO}:tiny.safetensors", 2)
    hub.add_revision(REPO, "main", {"tiny.safetensors": checkpoints[1]})
    hub.cut_downloads = True
    assert "HF_HUB_OFFLINE=1" in hub_error(f"{REPO}:tiny.safetensors")
    set_offline(monkeypatch, True)
    assert resolve_weights(f"{REPO}:tiny.safetensors", 2).read_bytes() == checkpoints[0] == cached.read_bytes()
    set_offline(monkeypatch, False)
    hub.cut_downloads = False  # and the new commit downloads when it can
    assert resolve_weights(f"{REPO}:tiny.safetensors", 2).read_bytes() == checkpoints[1]


def test_a_hosts_own_download_in_another_thread_is_not_taken_for_refsrs(hub, monkeypatch):
    """answers_seen recorded every thread's file metadata: a host's hf_hub_download of another file meanwhile made
    refsr refuse its good copy ("the Hub names this commit's file" the other file's hash)."""
    import threading
    from huggingface_hub import hf_hub_download
    hub.add_revision("other/model", "main", {"config.json": b"{}"}, lfs=False)
    answer = hub._cdn_answer
    monkeypatch.setattr(hub, "_cdn_answer", lambda path: (time.sleep(1.5), answer(path))[1])
    host = threading.Thread(target=lambda: (time.sleep(0.5), hf_hub_download("other/model", "config.json")))
    host.start()
    try:
        assert load_weights(f"{REPO}:tiny.safetensors", 2).path.name == "tiny.safetensors"
    finally:
        host.join()


def test_the_python_push_refuses_a_path_object_that_gives_no_name(hub, monkeypatch):
    from refsr_cli import hub as refsr_hub
    monkeypatch.setenv("HF_TOKEN", "hf_loopback_test_token")
    for gives in (None, 5, b"x4.safetensors"):
        named = type("P", (), {"__fspath__": lambda self, gives=gives: gives})()
        with pytest.raises(RefsrError, match="^files: P is not a file name"):
            refsr_hub.push([named], "me/q1")
    assert hub.count() == 0


# --- sweep 27b ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_a_blob_that_is_not_a_file_is_named_as_the_file_to_remove(hub, checkpoints, kind):
    """The line named the snapshot's link: removed as told, huggingface_hub linked it again to the blob that was still
    there, and the same line came back for good."""
    import os
    from pathlib import Path
    path = resolve_weights(f"{REPO}:tiny.safetensors", 2)
    blob = Path(os.path.realpath(path))
    blob.unlink()
    if kind == "fifo":
        os.mkfifo(blob)
    else:
        blob.mkdir()
    message = hub_error(f"{REPO}:tiny.safetensors")
    named = message.split("copy ", 1)[1].split(" is not a regular file")[0]
    assert Path(named) == blob, message
    (os.remove if kind == "fifo" else os.rmdir)(named)  # as the line says
    assert resolve_weights(f"{REPO}:tiny.safetensors", 2).read_bytes() == checkpoints[0]


# --- sweep 28b ------------------------------------------------------------------------------------------------------

def test_a_download_killed_outright_names_the_cached_commit_to_pin(hub, checkpoints, monkeypatch):
    """SIGKILL (or the OOM killer) mid-download leaves refs/main naming the new commit, which ref_kept_on_failure
    cannot set back: offline, "not in the local cache" was false (the commit before was cached whole) and its advice
    did not help. The line names the cached commit, and pinning it loads that copy."""
    import contextlib
    from refsr_cli import hub as refsr_hub
    resolve_weights(f"{REPO}:tiny.safetensors", 2)
    hub.add_revision(REPO, "main", {"tiny.safetensors": checkpoints[1]})
    hub.cut_downloads = True
    monkeypatch.setattr(refsr_hub, "ref_kept_on_failure", lambda *args: contextlib.nullcontext())  # killed: no unwind
    hub_error(f"{REPO}:tiny.safetensors")
    set_offline(monkeypatch, True)
    message = hub_error(f"{REPO}:tiny.safetensors")
    assert "not in the local cache" in message and "the cache holds copies for commit" in message, message
    commit = message.split("copies for commit ", 1)[1].split(":", 1)[0]
    assert resolve_weights(f"{REPO}@{commit}:tiny.safetensors", 2).read_bytes() == checkpoints[0]


def test_the_cached_commit_hint_names_only_copies_that_are_there(hub, checkpoints, monkeypatch):
    """The hint named a snapshot whose blob was gone (a dangling link), and named a tag's commit for main when main
    was never downloaded ("a download of another was cut", which nothing was)."""
    import contextlib
    import os
    from pathlib import Path
    from refsr_cli import hub as refsr_hub
    tag = resolve_weights(f"{REPO}@v1:tiny.safetensors", 2)  # only the tag's copy
    set_offline(monkeypatch, True)
    assert "copies for commit" not in hub_error(f"{REPO}:tiny.safetensors")  # main was never downloaded
    set_offline(monkeypatch, False)
    resolve_weights(f"{REPO}:tiny.safetensors", 2)
    hub.add_revision(REPO, "main", {"tiny.safetensors": checkpoints[1]})
    hub.cut_downloads = True
    monkeypatch.setattr(refsr_hub, "ref_kept_on_failure", lambda *args: contextlib.nullcontext())
    hub_error(f"{REPO}:tiny.safetensors")
    set_offline(monkeypatch, True)
    message = hub_error(f"{REPO}:tiny.safetensors")
    assert f"{tag.parent.name} (v1)" in message, message  # the tag's copy, named as the tag's
    main_copy = next(p for p in (hub.cache).rglob("snapshots/*/tiny.safetensors") if p.parent != tag.parent)
    Path(os.path.realpath(main_copy)).unlink()  # its blob gone: the link dangles
    message = hub_error(f"{REPO}:tiny.safetensors")
    assert main_copy.parent.name not in message and tag.parent.name in message, message
