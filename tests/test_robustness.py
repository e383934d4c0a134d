"""Bad and unusual inputs, generated here: each gets one clear line, the right exit code, and leaves nothing behind."""
import errno
import io
import os
import signal
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import one_error_line, smooth_image, write_png
from refsr_cli.cli import main
from refsr_cli.images import exif_transpose, read_picture, write_picture
from refsr_cli.provenance import read_provenance


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def upscale(tmp_path, checkpoint, *inputs, extra=()):
    return run("upscale", *inputs, "--scale", 2, "--weights", checkpoint, "-o", tmp_path / "out", "-q",
               "--device", "cpu", *extra)


def leftovers(folder):
    return [p.name for p in folder.iterdir()] if folder.exists() else []


def png_bytes(h=12, w=16):
    buffer = io.BytesIO()
    Image.fromarray(smooth_image(h, w)).save(buffer, format="PNG")
    return buffer.getvalue()


def bad_inputs(tmp_path):
    """name -> (path, expected message fragment)."""
    cases = {}
    (tmp_path / "notes.png").write_text("just some text\n")
    cases["text"] = (tmp_path / "notes.png", "not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    cases["zero bytes"] = (tmp_path / "empty.png", "not an image")
    (tmp_path / "folder.png").mkdir()
    cases["a folder named like an image"] = (tmp_path / "folder.png", "folder has no images")
    (tmp_path / "truncated.png").write_bytes(png_bytes()[:120])
    cases["truncated png"] = (tmp_path / "truncated.png", "truncated")
    buffer = io.BytesIO()
    Image.fromarray(smooth_image(64, 64)).save(buffer, format="JPEG")
    (tmp_path / "truncated.jpg").write_bytes(buffer.getvalue()[:400])
    cases["truncated jpeg"] = (tmp_path / "truncated.jpg", "truncated")
    buffer = io.BytesIO()
    Image.fromarray(smooth_image(64, 64)).save(buffer, format="WEBP")
    (tmp_path / "truncated.webp").write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2])
    cases["truncated webp"] = (tmp_path / "truncated.webp", "truncated.webp")
    data = bytearray(png_bytes(64, 64))
    data[60:80] = b"\x00" * 20  # inside the compressed pixel data: the CRC and the inflate both fail
    (tmp_path / "corrupt.png").write_bytes(bytes(data))
    cases["corrupt png"] = (tmp_path / "corrupt.png", "corrupt")
    (tmp_path / "vector.png").write_bytes(b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>')
    cases["unsupported format"] = (tmp_path / "vector.png", "not an image")
    # A decompression bomb: a valid PNG header claiming 100000 x 100000 pixels; refused before decoding.
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    (tmp_path / "bomb.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + chunk(b"IEND", b""))
    cases["decompression bomb"] = (tmp_path / "bomb.png", "over the 64 Mpx limit (upscale, sample and walk raise it "
                                                          "with --max-pixels)")
    write_png(tmp_path / "tiny.png", 3, 3)
    cases["too small"] = (tmp_path / "tiny.png", "too small")
    return cases


def test_every_bad_input_gets_one_line_and_nothing_is_left(tmp_path, checkpoint):
    for name, (path, fragment) in bad_inputs(tmp_path).items():
        result = upscale(tmp_path, checkpoint, path)
        assert result.exit_code == 1, name
        one_error_line(result, str(path), fragment)
        assert leftovers(tmp_path / "out") == [], name


def test_a_batch_goes_on_past_bad_files(tmp_path, checkpoint):
    cases = bad_inputs(tmp_path)
    good = write_png(tmp_path / "good.png")
    inputs = [path for path, _ in cases.values()] + [good]
    result = run("upscale", *map(str, inputs), "--scale", "2", "--weights", str(checkpoint),
                 "-o", str(tmp_path / "out"))
    assert result.exit_code == 1
    assert len([line for line in result.stderr.splitlines() if line.startswith("refsr: error:")]) == len(cases)
    assert f"1 written, 0 skipped, {len(cases)} failed" in result.stderr
    assert leftovers(tmp_path / "out") == ["good_x2.png"]


def test_max_pixels_raises_the_limit(tmp_path, checkpoint):
    lr = write_png(tmp_path / "photo.png", 12, 16)
    assert upscale(tmp_path, checkpoint, lr, extra=("--max-pixels", 100)).exit_code == 1
    assert upscale(tmp_path, checkpoint, lr, extra=("--max-pixels", 192)).exit_code == 0


def test_unreadable_reference(tmp_path, checkpoint):
    lr = write_png(tmp_path / "photo.png")
    (tmp_path / "ref.jpg").write_bytes(b"\xff\xd8\xff garbage")
    result = upscale(tmp_path, checkpoint, lr, extra=("--ref", tmp_path / "ref.jpg"))
    assert result.exit_code == 2  # the one reference: its line is the run's one error line
    one_error_line(result, "reference", "ref.jpg")


def test_permission_denied(tmp_path, checkpoint, monkeypatch):
    lr = write_png(tmp_path / "photo.png")

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(Image, "open", denied)  # root can read anything; simulate the user who cannot
    result = upscale(tmp_path, checkpoint, lr)
    assert result.exit_code == 1
    one_error_line(result, "photo.png: permission denied")


def test_output_folder_that_cannot_be_created(tmp_path, checkpoint):
    lr = write_png(tmp_path / "photo.png")
    (tmp_path / "file").write_text("a file, not a folder")
    result = run("upscale", lr, "--scale", "2", "--weights", checkpoint, "-o", tmp_path / "file" / "out")
    assert result.exit_code == 2
    one_error_line(result, "cannot create the output folder")


def test_output_folder_that_cannot_be_written(tmp_path, checkpoint, monkeypatch):
    import tempfile
    lr = write_png(tmp_path / "photo.png")

    def read_only(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(tempfile, "mkstemp", read_only)  # root writes anywhere; simulate a read-only folder
    result = upscale(tmp_path, checkpoint, lr)
    assert result.exit_code == 1
    one_error_line(result, "photo.png: cannot write the output (Permission denied)")


def test_disk_full_while_writing_leaves_no_partial_file(tmp_path, checkpoint, monkeypatch):
    lr = write_png(tmp_path / "photo.png")
    original = Image.Image.save

    def full_disk(self, fp, *args, **kwargs):
        with open(fp, "wb") as f:
            f.write(b"\x89PNG half an image")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Image.Image, "save", full_disk)
    result = upscale(tmp_path, checkpoint, lr)
    monkeypatch.setattr(Image.Image, "save", original)
    assert result.exit_code == 1
    one_error_line(result, "photo.png", "No space left on device")
    assert leftovers(tmp_path / "out") == []


@pytest.mark.parametrize("content, fragment", [
    (b"", "not a readable safetensors"),
    (b"\x80\x04\x95 a pickle", "not a readable safetensors"),
])
def test_bad_weights(tmp_path, content, fragment):
    lr = write_png(tmp_path / "photo.png")
    (tmp_path / "w.safetensors").write_bytes(content)
    result = run("upscale", lr, "--scale", "2", "--weights", tmp_path / "w.safetensors", "-o", tmp_path / "out")
    assert result.exit_code == 2
    one_error_line(result, "w.safetensors", fragment)


def test_truncated_weights(tmp_path, checkpoint):
    lr = write_png(tmp_path / "photo.png")
    data = checkpoint.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:len(data) // 2])
    result = run("upscale", lr, "--scale", "2", "--weights", tmp_path / "cut.safetensors", "-o", tmp_path / "out")
    assert result.exit_code == 2
    one_error_line(result, "cut.safetensors")


@pytest.mark.parametrize("flags, fragment", [
    (("--n", "-1"), "-1 is not in the range"),
    (("--temperature", "-0.5"), "-0.5 is not in the range"),
    (("--scale", "3"), "'3' is not one of"),
    (("--n", "100000000"), "100000000 is not in the range"),  # bounded before any z is drawn
])
def test_invalid_flag_values(tmp_path, checkpoint, flags, fragment):
    lr = write_png(tmp_path / "photo.png")
    result = run("sample", lr, "--weights", checkpoint, "-o", tmp_path / "out", *flags)
    assert result.exit_code == 2 and fragment in result.stderr and "Traceback" not in result.output


# --- images people actually have -------------------------------------------------------------------------------

def roundtrip(tmp_path, checkpoint, name, image: Image.Image, **save):
    image.save(tmp_path / name, **save)
    result = upscale(tmp_path, checkpoint, tmp_path / name)
    assert result.exit_code == 0, result.output
    return Image.open(tmp_path / "out" / f"{os.path.splitext(name)[0]}_x2.png")


def test_rgba_keeps_its_alpha(tmp_path, checkpoint):
    rgb = smooth_image(12, 16)
    alpha = np.zeros((12, 16), np.uint8)
    alpha[:, 8:] = 255
    out = roundtrip(tmp_path, checkpoint, "logo.png", Image.fromarray(np.dstack([rgb, alpha])))
    assert out.mode == "RGBA" and out.size == (32, 24)
    a = np.asarray(out)[..., 3]
    assert a[:, :12].max() < 10 and a[:, 20:].min() > 245  # transparent left, opaque right


def test_grayscale_stays_grayscale(tmp_path, checkpoint):
    gray = Image.fromarray(smooth_image(12, 16)).convert("L")
    assert roundtrip(tmp_path, checkpoint, "gray.png", gray).mode == "L"
    assert roundtrip(tmp_path, checkpoint, "gray-alpha.png", gray.convert("LA")).mode == "LA"


def test_palette_and_cmyk(tmp_path, checkpoint):
    rgb = Image.fromarray(smooth_image(12, 16))
    assert roundtrip(tmp_path, checkpoint, "palette.png", rgb.convert("P")).mode == "RGB"
    assert roundtrip(tmp_path, checkpoint, "print.jpg", rgb.convert("CMYK")).mode == "RGB"


def test_16_bit_png_round_trip(tmp_path):
    import png
    rng = np.random.default_rng(0)
    data = (rng.random((6, 7, 3)) * 65535).astype(np.uint16)
    png.Writer(7, 6, bitdepth=16, greyscale=False).write(open(tmp_path / "deep.png", "wb"),
                                                          data.reshape(6, 21).tolist())
    picture = read_picture(tmp_path / "deep.png")
    assert picture.bits == 16
    # Full precision in: values that 8 bits cannot hold.
    assert np.allclose(picture.rgb * 65535, data, atol=0.01)
    write_picture(data, tmp_path / "again.png")
    assert np.array_equal(read_picture(tmp_path / "again.png").rgb, picture.rgb)


@pytest.mark.parametrize("greyscale", [True, False])
def test_a_16_bit_png_with_an_sbit_chunk_keeps_its_brightness(tmp_path, greyscale):
    """pypng's asDirect gives the sBIT depth's values (0..1023 for a 10-bit camera file): read as 16 bits, the
    image was 64 times too dark, and upscale exited 0."""
    import png
    planes = 1 if greyscale else 3
    tenbit = np.random.default_rng(5).integers(0, 1024, (8, 9 * planes))
    png.Writer(9, 8, greyscale=greyscale, bitdepth=10).write(open(tmp_path / "s.png", "wb"), tenbit.tolist())
    picture = read_picture(tmp_path / "s.png")
    assert np.allclose(picture.rgb[..., :planes].reshape(8, 9 * planes), tenbit / 1023, atol=1e-4)


def test_16_bit_png_keeps_its_icc_profile_and_text(tmp_path):
    from PIL import ImageCms
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    data = (np.random.default_rng(1).random((5, 9, 2)) * 65535).astype(np.uint16)  # grey + alpha
    write_picture(data, tmp_path / "deep.png", icc_profile=icc, provenance={"refsr": "test", "seed": 3})
    with Image.open(tmp_path / "deep.png") as im:
        assert im.info["icc_profile"] == icc and im.info["Software"].startswith("refsr")
    assert read_provenance(tmp_path / "deep.png")["seed"] == 3
    picture = read_picture(tmp_path / "deep.png")
    assert picture.bits == 16 and picture.grayscale
    assert np.array_equal((picture.alpha * 65535).round(), data[..., 1])


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_of_16_bit_pixels_matches_pillow(orientation):
    from PIL import ImageOps
    image = Image.fromarray(smooth_image(6, 10, seed=orientation))
    image.getexif()[0x0112] = orientation
    expected = np.asarray(ImageOps.exif_transpose(image)).astype(np.uint16) * 257
    deep = np.asarray(image).astype(np.uint16) * 257
    assert np.array_equal(exif_transpose(deep, orientation), expected)


def test_16_bit_png_through_the_cli(tmp_path, checkpoint):
    import png
    data = (smooth_image(12, 16).astype(np.uint16) * 257 + 100).clip(0, 65535).astype(np.uint16)
    png.Writer(16, 12, bitdepth=16, greyscale=False).write(open(tmp_path / "deep.png", "wb"),
                                                            data.reshape(12, 48).tolist())
    assert upscale(tmp_path, checkpoint, tmp_path / "deep.png").exit_code == 0
    out = png.Reader(filename=str(tmp_path / "out" / "deep_x2.png")).asDirect()
    assert out[3]["bitdepth"] == 16 and (out[0], out[1]) == (32, 24)
    values = np.vstack([np.asarray(r) for r in out[2]])
    assert (values % 257 != 0).any()  # not 8-bit values scaled up


def test_exif_orientation_is_applied(tmp_path, checkpoint):
    image = Image.fromarray(smooth_image(12, 20))
    exif = image.getexif()
    exif[0x0112] = 6  # rotated: the camera was held upright
    image.save(tmp_path / "phone.jpg", exif=exif)
    picture = read_picture(tmp_path / "phone.jpg")
    assert picture.rgb.shape[:2] == (20, 12)
    out = roundtrip(tmp_path, checkpoint, "phone2.jpg", image, exif=exif)
    assert out.size == (24, 40)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_pillow(tmp_path, orientation):
    from PIL import ImageOps
    image = Image.fromarray(smooth_image(6, 10, seed=orientation))
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(tmp_path / "o.png", exif=exif)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "o.png")).convert("RGB"))
    assert np.array_equal((read_picture(tmp_path / "o.png").rgb * 255).round().astype(np.uint8), expected)


def test_icc_profile_is_carried(tmp_path, checkpoint):
    from PIL import ImageCms
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    out = roundtrip(tmp_path, checkpoint, "colour.png", Image.fromarray(smooth_image(12, 16)), icc_profile=icc)
    assert out.info.get("icc_profile") == icc


def test_animated_gif_uses_the_first_frame_with_a_warning(tmp_path, checkpoint):
    frames = [Image.fromarray(smooth_image(12, 16, seed=i)) for i in range(3)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    result = run("upscale", tmp_path / "anim.gif", "--scale", "2", "--weights", checkpoint, "-o", tmp_path / "out")
    assert result.exit_code == 0
    assert "warning" in result.stderr and "only the first frame" in result.stderr
    assert leftovers(tmp_path / "out") == ["anim_x2.png"]


def test_output_format_from_extension_or_flag(tmp_path, checkpoint):
    lr = write_png(tmp_path / "photo.png")
    result = run("upscale", lr, "--scale", "2", "--weights", checkpoint, "-o", tmp_path / "result.jpg", "-q")
    assert result.exit_code == 0 and Image.open(tmp_path / "result.jpg").format == "JPEG"
    result = run("upscale", lr, "--scale", "2", "--weights", checkpoint, "-o", tmp_path / "o", "--format", "webp")
    assert result.exit_code == 0 and Image.open(tmp_path / "o" / "photo_x2.webp").format == "WEBP"
    result = run("sample", lr, "--n", "2", "--scale", "2", "--weights", checkpoint, "-o", tmp_path / "one.png")
    assert result.exit_code == 2 and "names one file, but this run writes 2" in result.stderr


# --- interruptions ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_mid_batch_keeps_finished_outputs(tmp_path, checkpoint, sig, code):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(40):
        write_png(photos / f"p{i:02d}.png", 48, 48, seed=i)
    out = tmp_path / "out"
    # SIGINT at its default in the child: a shell that starts this suite in the background ignores it, and an
    # ignored signal stays ignored across exec (refsr rightly leaves it so).
    proc = subprocess.Popen([sys.executable, "-m", "refsr_cli", "sample", str(photos), "--n", "4", "--scale", "2",
                             "--weights", str(checkpoint), "-o", str(out), "--device", "cpu", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("*.png"))) < 3:
        time.sleep(0.05)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    written = sorted(p.name for p in out.iterdir())
    assert all(not name.startswith(".") for name in written), written  # no temporary file left
    assert 3 <= len(written) < 160, (written, stderr)
    reported = [line for line in stdout.splitlines() if line.startswith("{")]
    assert len(reported) == len(written), (reported, written, stderr)  # every reported file exists, complete
    for name in written:
        Image.open(out / name).load()


def test_smallest_tile_works_with_the_default_context(tmp_path, checkpoint):
    lr = write_png(tmp_path / "photo.png", 40, 36)
    result = run("upscale", lr, "--scale", "2", "--weights", checkpoint, "--tile", "16", "-o", tmp_path / "a", "-q")
    assert result.exit_code == 0, result.output
    whole = run("upscale", lr, "--scale", "2", "--weights", checkpoint, "-o", tmp_path / "b", "-q")
    assert whole.exit_code == 0
    a, b = (np.asarray(Image.open(tmp_path / d / "photo_x2.png"), dtype=int) for d in ("a", "b"))
    assert np.abs(a - b).max() <= 2


def test_a_folder_upscaled_into_itself_twice_never_takes_its_outputs_as_inputs(tmp_path, checkpoint):
    folder = tmp_path / "same"
    folder.mkdir()
    write_png(folder / "four.png")
    for extra in ((), ("--skip-existing",), ("--overwrite",)):
        result = run("upscale", folder, "--scale", "2", "--weights", checkpoint, "-o", folder, "-q", *extra)
        assert result.exit_code == 0, result.output
        assert sorted(p.name for p in folder.iterdir()) == ["four.png", "four_x2.png"]
    # A file named on its own is taken, even an output.
    result = run("upscale", folder / "four_x2.png", "--scale", "2", "--weights", checkpoint, "-o", folder, "-q")
    assert result.exit_code == 0 and (folder / "four_x2_x2.png").exists()


def test_an_input_is_never_overwritten(tmp_path, checkpoint):
    lr = write_png(tmp_path / "x.png")
    before = lr.read_bytes()
    result = run("upscale", lr, "--scale", "2", "--weights", checkpoint, "-o", lr, "--overwrite")
    assert result.exit_code == 2 and "is an input of this run" in result.stderr
    assert lr.read_bytes() == before


@pytest.mark.parametrize("fmt", ["png", "jpg", "webp", "tiff"])
def test_every_output_format_carries_the_software_tag(tmp_path, checkpoint, fmt):
    from refsr_cli.images import is_refsr_output
    lr = write_png(tmp_path / "photo.png")
    assert not is_refsr_output(lr)
    result = run("upscale", lr, "--scale", "2", "--weights", checkpoint, "--format", fmt, "-o", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    assert is_refsr_output(tmp_path / "out" / f"photo_x2.{fmt}")


def test_32_bit_and_float_tiffs_are_read_or_refused_clearly(tmp_path, checkpoint):
    grey = smooth_image(12, 16)[..., 0].astype(np.float64) / 255
    ok_int, ok_float = tmp_path / "int.tif", tmp_path / "float.tif"
    Image.fromarray((grey * 65535).round().astype(np.int32), mode="I").save(ok_int)
    Image.fromarray(grey.astype(np.float32), mode="F").save(ok_float)
    bad_int, bad_float = tmp_path / "int-wide.tif", tmp_path / "float-hdr.tif"
    Image.fromarray((grey * 200000).astype(np.int32), mode="I").save(bad_int)
    Image.fromarray((grey * 4).astype(np.float32), mode="F").save(bad_float)
    result = run("upscale", ok_int, ok_float, bad_int, bad_float, "--scale", "2", "--weights", checkpoint,
                 "-o", tmp_path / "out", "-q")
    assert result.exit_code == 1
    assert "outside 0..65535" in result.stderr and "outside [0, 1]" in result.stderr
    a, b = (np.asarray(Image.open(tmp_path / "out" / f"{n}_x2.png")).astype(float) / 65535 for n in ("int", "float"))
    assert a.ndim == 2 and np.abs(a - b).max() < 2e-4  # the same picture, not black, not wrapped
    assert abs(a.mean() - grey.mean()) < 0.02


def test_a_signal_while_a_file_is_written_waits_until_it_is_reported():
    from refsr_cli.report import Terminated, on_sigterm, signals_held
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own, even when started ignored
    done = []
    try:
        with pytest.raises(Terminated):
            with signals_held():
                signal.raise_signal(signal.SIGTERM)  # delivered to this thread before it returns, unlike os.kill
                time.sleep(0.05)  # the handler would run here, between the write and the report
                done.append("written and reported")
        with pytest.raises(KeyboardInterrupt):
            with signals_held():
                signal.raise_signal(signal.SIGINT)
                time.sleep(0.05)
                done.append("again")
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored by signals_held
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
    assert done == ["written and reported", "again"]
