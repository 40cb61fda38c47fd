"""The colours of the most common classes in real pictures, for the first-impression tests:
    scripts/class-colours.py DATASET [--top 10] > tests/data/class_colours.json
DATASET is one made by ``segsynth dataset make`` (the recipe's data_train_256). For each of the
``top`` classes with the most pixels: its share of the pixels, and the mean RGB of its pixels in
each picture where it covers at least a tenth (letterbox bars, blank and black pictures left out:
what the segmenter calls them says nothing of the class), summarised as the mean and the 5th and 95th
percentiles over those pictures (what a uniform map of that class may sanely be painted)."""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from segsynth.core import labels
from segsynth.stream.pictures import black_bars, paint_bars


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args()
    manifest = json.loads((args.data / "manifest.json").read_text())
    names = labels.get(manifest["label_set"]).names
    counts = np.zeros(256, np.int64)
    per_picture: dict[int, list[np.ndarray]] = {}
    for item in manifest["items"]:
        ids = np.asarray(Image.open(args.data / item["label"]))
        rgb = np.asarray(Image.open(args.data / item["image"]).convert("RGB")).astype(np.float64)
        if rgb.std() < 8 or np.median(rgb.max(2)) < 24:  # blank, or black with a title
            continue
        bars = paint_bars(np.ones(ids.shape, bool), black_bars(rgb.astype(np.uint8)))
        ids = np.where(bars, ids, 255)
        found = np.bincount(ids.ravel(), minlength=256)
        found[255] = 0
        counts += found
        for k in np.flatnonzero(found >= ids.size // 10):
            per_picture.setdefault(int(k), []).append(rgb[ids == k].mean(0))
    top = [int(k) for k in np.argsort(-counts) if k != 255 and k in per_picture][: args.top]
    out = {"dataset": args.data.name, "label_set": manifest["label_set"], "pictures": len(manifest["items"]),
           "classes": [{"id": k, "name": names[k][0], "share": round(float(counts[k] / counts.sum()), 4),
                        "pictures": len(per_picture[k]),
                        "mean": np.round(np.mean(per_picture[k], 0), 1).tolist(),
                        "p5": np.round(np.percentile(per_picture[k], 5, 0), 1).tolist(),
                        "p95": np.round(np.percentile(per_picture[k], 95, 0), 1).tolist()} for k in top]}
    json.dump(out, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
