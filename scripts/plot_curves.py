"""The model card's training curves: the validation numbers each run logged (`--val-every`), against the steps
trained so far in the shipped lineage, so that a continuation (`--init` a shipped file) starts where its parent
ended. Drawn with Pillow, which refsr already needs.

    python scripts/plot_curves.py -o docs/sheets/curves.png
"""
import argparse
import json
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

RUNS = Path(__file__).resolve().parent.parent / "docs" / "runs"
EVALS = RUNS.parent / "eval" / "x8-imle"
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf"]

# (title, [(label, log file, metric, steps before the run started)]); a run continued from another starts at its
# parent's last step.
# Only the runs behind the shipped checkpoints keep their logs in docs/runs/ (the others, and the IMLE line's
# panels of the committed docs/sheets/curves.png, are in git history before the model card became a card).
PANELS = [
    ("trunk: val PSNR-Y gain over bicubic (dB)", [
        (f"x{s}", log, (f"val_psnr_x{s}", f"val_bicubic_x{s}"), offset)
        for s in (2, 4, 8) for log, offset in (("trunk-log.jsonl", 0), ("trunk2-log.jsonl", 5000))]),
    ("x8 texture: val LPIPS, one prior sample", [("shipped (900)", "texture3-x8-log.jsonl", "val_lpips", 0)]),
    ("x4 texture: val LPIPS, one prior sample", [("1000 steps", "texture-x4-log.jsonl", "val_lpips", 0)]),
    ("x2 texture: val LPIPS, one prior sample", [("1000 steps", "texture-x2-log.jsonl", "val_lpips", 0)]),
]

# The x8 samples' LPIPS against their diversity as the sample temperature goes 0, 1, 1.5, 2, 3 (`refsr eval` of the
# six val crops, 10 samples; JSON in docs/eval/x8-imle/): temperature moves a checkpoint along its own front,
# training moves the front. T = 0 is the point at diversity 0 (every sample the same); the later checkpoints were
# measured at T = 1 only.
FRONT = ("x8 samples on 6 val crops: LPIPS (y) against diversity (x), T = 0..3", [
    ("shipped x8", "valcrops-shipped*.json"),
    ("textured style 1, +125", "valcrops-textured1-step125*.json"),
    ("+600 more (T = 1)", "valcrops-textured1b-step600*.json"),
    ("16 latents, +200 (T = 1)", "valcrops-m16-step200*.json")])


# The texture analogy's front (scripts/eval_front.sh: the six val crops, 10 samples): the samples' LPIPS of each
# backbone against their diversity, over --strength (T = 1) and over --temperature (strength 0.5); bicubic's LPIPS
# and the line, 0.9 x bicubic's LPIPS-vgg, for scale. Strength 0 is the faithful output, at diversity 0.
ANALOGY = RUNS.parent / "eval" / "analogy"


def analogy_front(metric: str) -> list:
    """The series of one panel of the analogy's front, for `metric` ("lpips_vgg" or "lpips")."""
    series, faithful, bicubic, top = {"over --strength (T = 1)": [], "over --temperature (S = 0.5)": []}, None, None, 0
    for path in sorted(ANALOGY.glob("front-valcrops-x8-s*-t*.json")):
        strength, temperature = (float(v) for v in path.stem.split("-s")[1].split("-t"))
        means = json.loads(path.read_text())["means"]
        faithful, bicubic = means["refsr"][metric], means["bicubic"][metric]
        point = (means["samples"]["diversity"], means["samples"][metric])
        top = max(top, point[0])
        if temperature == 1:
            series["over --strength (T = 1)"].append(point)
        if strength == 0.5:
            series["over --temperature (S = 0.5)"].append(point)
    out = [(label, sorted(pts + [(0.0, faithful)])) for label, pts in series.items() if pts]
    if bicubic is not None:
        out.append(("bicubic", [(0.0, bicubic), (top, bicubic)]))
        if metric == "lpips_vgg":
            out.append(("0.9 x bicubic (target)", [(0.0, 0.9 * bicubic), (top, 0.9 * bicubic)]))
    return out


def points(log: Path, metric, offset: int) -> list[tuple[float, float]]:
    """(step, value) of every validation line; metric is a key, or (key, baseline key) for a difference."""
    out = []
    for line in log.read_text().splitlines():
        row = json.loads(line)
        keys = metric if isinstance(metric, tuple) else (metric,)
        if keys[0] in row:
            value = row[keys[0]] - (row[keys[1]] if len(keys) > 1 else 0)
            out.append((row["step"] + offset, value))
    return out


def front_points(pattern: str) -> list[tuple[float, float]]:
    """(diversity, LPIPS) of the samples in each eval JSON matching pattern, and the T = 0 point (0, its LPIPS)."""
    pts = set()
    for path in EVALS.glob(pattern):
        means = json.loads(path.read_text())["means"]
        pts.add((0.0, means["refsr"]["lpips"]))
        pts.add((means["samples"]["diversity"], means["samples"]["lpips"]))
    return sorted(pts)


def draw_panel(title: str, series: list[tuple[str, list[tuple[float, float]]]], xlabel="step",
               size=(520, 360)) -> Image.Image:
    panel = Image.new("RGB", size, "white")
    draw, font = ImageDraw.Draw(panel), ImageFont.load_default()
    left, top, right, bottom = 56, 24, size[0] - 16, size[1] - 62
    xs = [x for _, pts in series for x, _ in pts] + [0]
    ys = [y for _, pts in series for _, y in pts]
    x0, x1 = 0, max(xs)
    y0, y1 = min(ys), max(ys)
    pad = (y1 - y0) * 0.1 or abs(y1) * 0.05 or 1
    y0, y1 = y0 - pad, y1 + pad

    def at(x, y):
        return (left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top))

    draw.text((left, 6), title, fill="black", font=font)
    draw.rectangle((left, top, right, bottom), outline="black")
    for i in range(5):  # four intervals on each axis, labelled
        y = y0 + (y1 - y0) * i / 4
        digits = 4 if y1 - y0 < 0.01 else 3 if y1 - y0 < 0.1 else 2
        draw.text((4, at(0, y)[1] - 5), f"{y:.{digits}f}", fill="black", font=font)
        x = x0 + (x1 - x0) * i / 4
        draw.text((at(x, y0)[0] - 10, bottom + 4), f"{x:.0f}", fill="black", font=font)
    draw.text((right - draw.textlength(xlabel, font=font), bottom + 16), xlabel, fill="black", font=font)
    labels = list(dict.fromkeys(label for label, _ in series))
    for label, pts in series:
        colour = COLOURS[labels.index(label) % len(COLOURS)]
        coords = [at(x, y) for x, y in pts]
        if len(coords) > 1:
            draw.line(coords, fill=colour, width=2)
        for cx, cy in coords:
            draw.ellipse((cx - 3, cy - 3, cx + 3, cy + 3), fill=colour)
    x, y = left, size[1] - 30
    for i, label in enumerate(labels):  # legend under the axis, two rows where one is not wide enough
        if x + 36 + draw.textlength(label, font=font) > size[0]:
            x, y = left, y + 14
        draw.line((x, y + 6, x + 16, y + 6), fill=COLOURS[i % len(COLOURS)], width=2)
        draw.text((x + 20, y), label, fill="black", font=font)
        x += 20 + draw.textlength(label, font=font) + 16
    return panel


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--out", type=Path, required=True)
    args = parser.parse_args()
    panels = []
    for title, runs in PANELS:
        series = {}
        for label, log, metric, offset in runs:  # one line per label: a trunk and its continuation join up
            series.setdefault(label, []).extend(points(RUNS / log, metric, offset))
        panels.append(draw_panel(title, [(label, sorted(pts)) for label, pts in series.items()]))
    title, fronts = FRONT
    panels.append(draw_panel(title, [(label, front_points(pattern)) for label, pattern in fronts], "diversity"))
    for metric, name in (("lpips_vgg", "LPIPS-vgg"), ("lpips", "LPIPS-alex")):
        series = analogy_front(metric)
        if series:
            panels.append(draw_panel(f"x8 samples by analogy on 6 val crops: {name} (y) against diversity (x)",
                                     series, "diversity"))
    w, h = panels[0].size
    sheet = Image.new("RGB", (2 * w, h * ((len(panels) + 1) // 2)), "white")
    for i, panel in enumerate(panels):
        sheet.paste(panel, ((i % 2) * w, (i // 2) * h))
    sheet.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
