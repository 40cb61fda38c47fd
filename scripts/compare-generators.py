#!/usr/bin/env python3
"""Score two generators side by side on held-out sets, in one run, and draw a sample grid.

  .venv/bin/python scripts/compare-generators.py OLD NEW --data SET... [--style IMAGE]
      [--grid OUT.png] [--rows N] [--json OUT.json]

OLD and NEW are what ``segsynth eval-generator`` takes ('default', an .onnx file, a
checkpoint directory). Each SET (made by ``segsynth dataset make``) is scored with the SPADE
paper's protocol plus PSNR, SSIM and the class colour distance, with ``--baselines``; the
markdown table goes to stdout. The grid's rows are label map | real | OLD | NEW | NEW with
the ``--style`` image's z, for evenly spaced pairs of every set.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from segsynth.core import labels
from segsynth.jobs.dataset import load_manifest, read_pair
from segsynth.jobs.eval_generator import evaluate
from segsynth.stream.infer.generator import load_generator
from segsynth.stream.io.demux import read_image
from segsynth.stream.pictures import resize_labels, resize_rgb

ROWS = (("fw_iou", "frequency-weighted IoU", "{:.3f}"), ("pixel_accuracy", "pixel accuracy", "{:.3f}"),
        ("miou", "mIoU (classes present)", "{:.3f}"), ("psnr", "PSNR vs the real frame (dB)", "{:.2f}"),
        ("ssim", "SSIM vs the real frame", "{:.3f}"), ("colour_distance", "class colour distance (lower: better)",
                                                      "{:.1f}"))


def table(name: str, old: dict, new: dict) -> str:
    blur = new["baselines"]["real_blur_1px"]
    lines = [f"**{name}** ({new['frames']} pairs)", "",
             "| | old default | new default | real, blurred 1 px |", "| --- | --- | --- | --- |"]
    for key, label, fmt in ROWS:
        base = fmt.format(blur[key]) if key in blur else ""
        lines.append(f"| {label} | {fmt.format(old[key])} | {fmt.format(new[key])} | {base} |")
    return "\n".join(lines) + "\n"


def paint(gen, label: np.ndarray, z) -> np.ndarray:
    h, w = label.shape
    return resize_rgb(gen(resize_labels(label, *gen.size)[None], z)[0], w, h)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--data", nargs="+", required=True)
    ap.add_argument("--style", help="a style image for the last column")
    ap.add_argument("--grid")
    ap.add_argument("--rows", type=int, default=2, help="grid rows per set")
    ap.add_argument("--json")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    results = {}
    for data in args.data:
        scores = {which: evaluate(spec, Path(data), threads=args.threads, quiet=True, baselines=True,
                                  backend="onnxruntime") for which, spec in (("old", args.old), ("new", args.new))}
        results[data] = scores
        print(table(Path(data).name, scores["old"], scores["new"]))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    if args.grid:
        from PIL import Image

        old, new = (load_generator(s, threads=args.threads) for s in (args.old, args.new))
        z0 = new.seeded_z(0) if new.uses_z else None  # seed 0, as run and eval-generator draw it
        z_old = old.seeded_z(0) if old.uses_z else None
        zs = new.encode_style(read_image(args.style)) if args.style else z0
        rows = []
        for data in args.data:
            manifest = load_manifest(data)
            items = manifest["items"]
            label_set = labels.get(manifest["label_set"])
            for i in np.linspace(0, len(items) - 1, min(args.rows, len(items))).astype(int):
                real, label = read_pair(Path(data), items[i])
                rows.append(np.concatenate([labels.colorize(label, label_set), real, paint(old, label, z_old),
                                            paint(new, label, z0), paint(new, label, zs)], 1))
        width = max(r.shape[1] for r in rows)
        padded = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
        Image.fromarray(np.concatenate(padded, 0)).save(args.grid)
        old.close()
        new.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
