"""What a paired evaluation leaves for a person: ``scores.csv``, ``report.md``, the
side-by-side ``grid.png`` (base | run per prompt, scores underneath) and the run's
training curves ``curves.png`` from its ``metrics.jsonl``."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from ..fsio import atomic_write, atomic_write_text

GRID_ROWS = 16  # prompts shown in the grid (all are in scores.json / scores.csv)
CURVES = (("loss", "loss"), ("implicit_acc", "implicit accuracy"), ("margin", "margin"),
          ("ref_mse_w", "reference MSE (preferred)"))


def write_csv(path: Path, result: dict) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["prompt_index", "prompt", "metric", "run", "base", "diff"])
    for rec in result["per_prompt"]:
        for m, s in rec["scores"].items():
            w.writerow([rec["index"], rec["prompt"], m, repr(s["run"]), repr(s["base"]),
                        repr(s["run"] - s["base"])])
    atomic_write_text(path, buf.getvalue())


def score_table(result: dict) -> str:
    """The per-metric table (markdown) of a paired result."""
    rows = ["| metric | base | run | run - base (95% CI) | run wins (95% CI) |",
            "| --- | ---: | ---: | ---: | ---: |"]
    for m, s in result["metrics"].items():
        lo, hi = s["diff_ci95"]
        wl, wh = s["win_rate_ci95"]
        better = "" if s["higher_is_better"] else " (lower is better)"
        rows.append(f"| {m}{better} | {s['base_mean']:.4g} | {s['run_mean']:.4g} | "
                    f"{s['mean_diff']:+.4g} ({lo:+.4g}, {hi:+.4g}) | "
                    f"{100 * s['win_rate']:.0f}% ({100 * wl:.0f}%, {100 * wh:.0f}%) |")
    f = result.get("fid")
    if f is not None:  # one number per image set: no interval, no win rate
        rows.append(f"| FID (lower is better; {f['reference_images']} reference images) | "
                    f"{f['base']:.4g} | {f['run']:.4g} | {f['diff']:+.4g} | |")
    return "\n".join(rows)


def write_report(path: Path, result: dict, *, grid: str | None, curves: str | None) -> None:
    s = result["settings"]
    lines = [f"# {result['run']} against {result['against']}", "",
             f"{len(result['per_prompt'])} prompts x {s['num_images_per_prompt']} image(s), "
             f"{s['steps']} steps, seed {s['seed']} (image j of prompt i: seed + 1000 i + j), "
             "the same noise for both models.", "", score_table(result), "",
             "Per prompt: the mean over its images; intervals: percentile bootstrap over "
             "prompts; a tie counts as half a win.", ""]
    if grid:
        lines += [f"![base | run]({grid})", ""]
    if curves:
        lines += ["## Training curves", "", f"![training curves]({curves})", ""]
    atomic_write_text(path, "\n".join(lines))


def write_grid(path: Path, result: dict, images: dict, metrics) -> None:
    """Rows: the first image of each prompt, base left, run right; a caption line under each
    with its scores (up to GRID_ROWS prompts)."""
    from PIL import Image, ImageDraw, ImageFont

    recs = result["per_prompt"][:GRID_ROWS]
    first = [(images["base"][(r["index"], 0)], images["run"][(r["index"], 0)]) for r in recs]
    cell = max(64, min(256, max(im.width for pair in first for im in pair)))
    font = ImageFont.load_default()
    text_h = 14 * 2 + 6
    head = 18
    grid = Image.new("RGB", (2 * cell + 12, head + len(recs) * (cell + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((4, 2), "base", fill="black", font=font)
    draw.text((cell + 8, 2), "run", fill="black", font=font)
    for row, (rec, pair) in enumerate(zip(recs, first)):
        y = head + row * (cell + text_h)
        for col, (im, side) in enumerate(zip(pair, ("base", "run"))):
            x = 4 + col * (cell + 4)
            grid.paste(im.resize((cell, cell)), (x, y))
            caption = " ".join(f"{m} {rec['scores'][m][side]:.3g}" for m in metrics)
            draw.text((x, y + cell + 2), caption[:48], fill="black", font=font)
        draw.text((4, y + cell + 16), rec["prompt"][:2 * cell // 6], fill="gray", font=font)
    atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))


def read_curves(metrics_file: Path) -> dict:
    """step -> value per curve from a run's metrics.jsonl (unreadable lines skipped)."""
    out = {k: ([], []) for k, _ in CURVES}
    for line in metrics_file.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if not isinstance(rec, dict) or "step" not in rec:
            continue
        for k, _ in CURVES:
            v = rec.get(k)
            if isinstance(v, (int, float)) and v == v:
                out[k][0].append(rec["step"])
                out[k][1].append(float(v))
    return {k: v for k, v in out.items() if v[0]}


def write_curves(path: Path, metrics_file: Path) -> bool:
    """One PNG with a panel per curve; False (nothing written) without matplotlib or data."""
    curves = read_curves(metrics_file)
    if not curves:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    titles = dict(CURVES)
    fig, axes = plt.subplots(1, len(curves), figsize=(3.2 * len(curves), 2.8), squeeze=False)
    for ax, (k, (steps, vals)) in zip(axes[0], curves.items()):
        ax.plot(steps, vals, marker="." if len(steps) < 50 else None)
        ax.set_title(titles[k], fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return True
