"""Label sets, class-name lookup, cross-set mapping and remap rules.

Ids follow the generator's conventions so label maps can go straight into SPADE:

* ``ade20k``   ADE20K-150 with SPADE's 0-based ids (wall = 0, person = 12); 255 = unknown.
* ``voc``      PASCAL VOC-21 (0 = background, 15 = person); 255 = void.
* ``coco-stuff`` COCO-Stuff-182 with SPADE's ids (COCO-Stuff id - 1: person = 0); 255 = unknown.
* ``cityscapes`` Cityscapes-19 train ids (road = 0); 255 = ignore.

All label maps are uint8; 255 is always "unknown / dontcare".
"""

from __future__ import annotations

import csv
import difflib
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

import numpy as np

from segsynth.core.errors import LabelError

UNKNOWN = 255


def name_key(name: str) -> str:
    """Case-, space-, dash- and underscore-insensitive key: 'Dining_Table' -> 'diningtable'."""
    return re.sub(r"[^0-9a-z]+", "", name.lower())


@dataclass(frozen=True)
class LabelSet:
    """An ordered list of class names (index = class id) with aliases and a colour palette."""

    name: str
    classes: tuple[str, ...]
    aliases: dict[str, int] = field(default_factory=dict, repr=False)  # key -> id
    names: tuple[tuple[str, ...], ...] = field(default=(), repr=False)  # every name of each class
    palette: np.ndarray = field(default=None, repr=False)  # (256, 3) uint8, row 255 = unknown

    def __len__(self) -> int:
        return len(self.classes)

    def id_of(self, name: str) -> int:
        """Id of a class by name (or numeric id); raises LabelError with suggestions."""
        text = name.strip()
        if text.isdigit():
            idx = int(text)
            if idx < len(self.classes) or idx == UNKNOWN:
                return idx
            raise LabelError(f"class id {idx} is out of range for {self.name} (0..{len(self) - 1}, 255)")
        key = name_key(text)
        if key in self.aliases:
            return self.aliases[key]
        raise LabelError(f"unknown class {text!r} in label set {self.name}{self._suggest(text)}")

    def nearest(self, name: str) -> tuple[int, str | None]:
        """Id of ``name`` in this set, or of its nearest class by meaning when only another
        known set has it (COCO-Stuff's bear -> ADE20K's animal), with a one-line note saying so.
        A name no set knows raises LabelError with suggestions from this set."""
        try:
            return self.id_of(name), None
        except LabelError:
            for other in LABEL_SETS:
                other_set = get(other)
                if other_set.name == self.name or name_key(name) not in other_set.aliases:
                    continue
                hit = int(mapping(other_set, self)[other_set.aliases[name_key(name)]])
                if hit != UNKNOWN:
                    return hit, (f"{name.strip()!r} is not a class of {self.name} ({other_set.name} has it); "
                                 f"using its nearest class {self.classes[hit]!r}")
                raise LabelError(f"class {name.strip()!r} ({other_set.name}) has no counterpart in {self.name}"
                                 f"{self._suggest(name)}") from None
            raise

    def name_of(self, idx: int) -> str:
        return self.classes[idx] if idx < len(self.classes) else "unknown"

    def _suggest(self, text: str) -> str:
        key = name_key(text)
        keys = difflib.get_close_matches(key, list(self.aliases), n=8, cutoff=0.6)
        names: list[str] = []
        for k in keys:
            cls = self.classes[self.aliases[k]]
            if cls not in names:
                names.append(cls)
        if not names:  # fall back to a substring match, useful for short typos like "prson"
            names = [c for c in self.classes if key and (key in name_key(c) or name_key(c) in key)][:5]
        if names:
            return f"; did you mean: {', '.join(names[:5])}?"
        return f"; its {len(self.classes)} classes: segsynth labels show {self.name}"


def _build(name: str, classes: list[str], extra_aliases: dict[int, list[str]], palette: np.ndarray) -> LabelSet:
    aliases: dict[str, int] = {}
    for idx, cls in enumerate(classes):  # primary names always win over aliases
        aliases.setdefault(name_key(cls), idx)
    for idx, names in extra_aliases.items():
        for alias in names:
            aliases.setdefault(name_key(alias), idx)
    aliases.setdefault("unknown", UNKNOWN)
    all_names = tuple(tuple(dict.fromkeys([cls, *extra_aliases.get(i, [])])) for i, cls in enumerate(classes))
    return LabelSet(name, tuple(classes), aliases, all_names, palette)


def _srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    c = rgb / 255.0
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    xyz = c @ np.array([[0.4124, 0.2126, 0.0193], [0.3576, 0.7152, 0.1192], [0.1805, 0.0722, 0.9505]])
    xyz /= np.array([0.9505, 1.0, 1.089])
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return np.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], 1)


def _distinct_palette(n: int) -> np.ndarray:
    """n colours, each as far (in CIELAB) from all earlier ones as possible: greedy
    farthest-point sampling over a 12-level RGB grid, starting next to black. Deterministic,
    so a class keeps its colour across runs and versions; lower ids get the most distinct."""
    levels = np.linspace(0, 255, 12)
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(-1, 3)
    lab = _srgb_to_lab(grid)
    dist = np.linalg.norm(lab - _srgb_to_lab(np.zeros((1, 3))), axis=1)  # keep black for 'unknown'
    pal = np.zeros((256, 3), np.uint8)
    for i in range(n):
        best = int(np.argmax(dist))
        pal[i] = np.round(grid[best])
        dist = np.minimum(dist, np.linalg.norm(lab - lab[best], axis=1))
    return pal


def _voc_palette() -> np.ndarray:
    """The standard PASCAL VOC colour map (bits of the id spread over R, G, B)."""
    pal = np.zeros((256, 3), np.uint8)
    for i in range(255):
        c, r, g, b = i, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        pal[i] = (r, g, b)
    pal[UNKNOWN] = (224, 224, 192)  # VOC's own colour for the void label
    return pal


VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
]

CITYSCAPES_CLASSES = [
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
]
# Cityscapes' official colours (cityscapesScripts labels.py).
CITYSCAPES_COLORS = [
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32),
]

# COCO-Stuff-182 (cocostuff labels.txt order, ids 1..182); SPADE uses id - 1.
COCO_STUFF_CLASSES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "street sign", "stop sign", "parking meter", "bench", "bird",
    "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "hat",
    "backpack", "umbrella", "shoe", "eye glasses", "handbag", "tie", "suitcase", "frisbee", "skis",
    "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "plate", "wine glass", "cup", "fork", "knife", "spoon", "bowl",
    "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut",
    "cake", "chair", "couch", "potted plant", "bed", "mirror", "dining table", "window", "desk",
    "toilet", "door", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave",
    "oven", "toaster", "sink", "refrigerator", "blender", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush", "hair brush", "banner", "blanket", "branch",
    "bridge", "building-other", "bush", "cabinet", "cage", "cardboard", "carpet", "ceiling-other",
    "ceiling-tile", "cloth", "clothes", "clouds", "counter", "cupboard", "curtain", "desk-stuff",
    "dirt", "door-stuff", "fence", "floor-marble", "floor-other", "floor-stone", "floor-tile",
    "floor-wood", "flower", "fog", "food-other", "fruit", "furniture-other", "grass", "gravel",
    "ground-other", "hill", "house", "leaves", "light", "mat", "metal", "mirror-stuff", "moss",
    "mountain", "mud", "napkin", "net", "paper", "pavement", "pillow", "plant-other", "plastic",
    "platform", "playingfield", "railing", "railroad", "river", "road", "rock", "roof", "rug",
    "salad", "sand", "sea", "shelf", "sky-other", "skyscraper", "snow", "solid-other", "stairs",
    "stone", "straw", "structural-other", "table", "tent", "textile-other", "towel", "tree",
    "vegetable", "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone",
    "wall-tile", "wall-wood", "water-other", "waterdrops", "window-blind", "window-other", "wood",
]

# Synonyms used both for lookup ("tv" finds "tvmonitor") and for mapping between sets.
# Ordered: the first name that exists in the target set wins.
_SYNONYMS = [
    ["aeroplane", "airplane", "plane"],
    ["motorbike", "motorcycle", "minibike"],
    ["tvmonitor", "television", "tv", "television receiver", "monitor"],
    ["diningtable", "dining table"],
    ["pottedplant", "potted plant"],
    ["sofa", "couch"],
    ["person", "rider"],
]
# Where a set has no class of that name: the next best class to map to (tried in order).
_FALLBACKS = {
    "bird": ["animal"], "cat": ["animal"], "cow": ["animal"], "dog": ["animal"],
    "horse": ["animal"], "sheep": ["animal"], "elephant": ["animal"], "bear": ["animal"],
    "zebra": ["animal"], "giraffe": ["animal"],
    "diningtable": ["table"], "dining table": ["table"], "pottedplant": ["plant", "plant-other"],
    "potted plant": ["plant"], "tvmonitor": ["television"], "vegetation": ["tree"],
    "terrain": ["grass"], "traffic sign": ["signboard", "stop sign"],
    "earth": ["ground-other", "dirt"], "land": ["ground-other"], "field": ["grass", "playingfield"],
    "palm": ["tree"], "lake": ["water-other"], "water": ["water-other"], "windowpane": ["window"],
    "painting": ["wall-other"], "apparel": ["clothes"], "truck": ["car"], "van": ["car"],
    "train": ["railroad"], "tent": ["hovel"], "wall-other": ["wall"], "sky-other": ["sky"],
    "armchair": ["chair"], "seat": ["chair"], "swivel chair": ["chair"], "stool": ["chair"],
    "ottoman": ["chair"], "wardrobe": ["cupboard", "cabinet"], "chest of drawers": ["cabinet"],
    "buffet": ["cabinet"], "bookcase": ["shelf"], "lamp": ["light"], "streetlight": ["light"],
    "chandelier": ["light"], "sconce": ["light"], "cushion": ["pillow"], "box": ["cardboard"],
    "coffee table": ["table"], "pool table": ["table"], "countertop": ["counter"],
    "kitchen island": ["counter"], "stove": ["oven"], "computer": ["laptop"], "screen door": ["door"],
    "stairway": ["stairs"], "step": ["stairs"], "escalator": ["stairs"], "blind": ["window-blind"],
    "path": ["pavement", "dirt"], "runway": ["road"], "dirt track": ["dirt"], "tower": ["building-other"],
    "hovel": ["house"], "ship": ["boat"], "fountain": ["water-other"], "swimming pool": ["water-other"],
    "waterfall": ["water-other"], "stage": ["platform"], "pier": ["platform"], "canopy": ["tent"],
    "awning": ["tent"], "plaything": ["teddy bear"], "bag": ["handbag"], "ball": ["sports ball"],
    "cradle": ["bed"], "tray": ["plate"], "glass": ["wine glass", "cup"], "crt screen": ["tv"],
    "screen": ["tv"], "bulletin board": ["banner"], "flag": ["banner"], "poster": ["banner"],
    "signboard": ["banner"], "column": ["structural-other"], "pole": ["metal"], "bannister": ["railing"],
    "fireplace": ["wall-brick"], "grandstand": ["platform"], "pot": ["vase"], "bathtub": ["sink"],
    "base": ["solid-other"],
}


def _synonyms(name: str) -> list[str]:
    for group in _SYNONYMS:
        if name in group:
            return [other for other in group if other != name]
    return []


def _other_aliases(classes: list[str]) -> dict[int, list[str]]:
    """COCO-Stuff 'X-other' classes are also found as 'X' (sky-other <- sky)."""
    out: dict[int, list[str]] = {}
    for idx, cls in enumerate(classes):
        names = _synonyms(cls)
        if cls.endswith("-other") or cls.endswith("-stuff"):
            names.append(cls.rsplit("-", 1)[0])
        if names:
            out[idx] = names
    return out


@lru_cache(maxsize=None)
def get(name: str) -> LabelSet:
    """The label set called ``name`` (ade20k, voc, coco-stuff, cityscapes)."""
    key = name_key(name)
    if key in ("ade20k", "ade", "ade20k150"):
        rows = list(csv.DictReader(
            resources.files("segsynth.data").joinpath("ade20k_150_labels.tsv").open(encoding="utf-8"),
            delimiter="\t"))
        rows = [r for r in rows if int(r["id"]) > 0]  # id 0 ('other') becomes 255 = unknown
        classes = [r["name"].strip() for r in rows]
        extra = {i: [a.strip() for a in r["full_name"].split(",")] + _synonyms(classes[i])
                 for i, r in enumerate(rows)}
        return _build("ade20k", classes, extra, _distinct_palette(len(classes)))
    if key in ("voc", "pascalvoc", "voc21"):
        return _build("voc", VOC_CLASSES, _other_aliases(VOC_CLASSES), _voc_palette())
    if key in ("cocostuff", "coco", "cocostuff182"):
        return _build("coco-stuff", COCO_STUFF_CLASSES, _other_aliases(COCO_STUFF_CLASSES),
                      _distinct_palette(len(COCO_STUFF_CLASSES)))
    if key in ("cityscapes", "cityscapes19"):
        pal = np.zeros((256, 3), np.uint8)
        pal[: len(CITYSCAPES_COLORS)] = CITYSCAPES_COLORS
        return _build("cityscapes", CITYSCAPES_CLASSES, _other_aliases(CITYSCAPES_CLASSES), pal)
    raise LabelError(f"unknown label set {name!r}; choose one of: {', '.join(LABEL_SETS)}")


LABEL_SETS = ("ade20k", "voc", "coco-stuff", "cityscapes")


# Colours a person associates with the classes they doodle (the studio paints with them; label
# maps and label files keep their ids, and the label views the label set's own palette).
DOODLE_COLOURS = {
    "sky": (135, 206, 235), "cloud": (236, 240, 245), "tree": (34, 120, 50), "grass": (110, 190, 70),
    "plant": (70, 160, 60), "flower": (235, 95, 170), "field": (200, 190, 110), "mountain": (120, 100, 85),
    "hill": (105, 140, 70), "rock": (130, 130, 130), "earth": (150, 110, 70), "sand": (235, 205, 160),
    "water": (60, 140, 220), "sea": (20, 90, 170), "river": (80, 160, 210), "lake": (50, 125, 200),
    "snow": (250, 250, 252), "road": (85, 85, 90), "sidewalk": (175, 170, 165), "building": (180, 165, 150),
    "house": (200, 140, 110), "wall": (215, 205, 185), "floor": (175, 135, 95), "ceiling": (235, 235, 230),
    "person": (240, 190, 160), "car": (200, 40, 40), "animal": (160, 110, 60), "fence": (140, 100, 70),
    "bridge": (150, 140, 130), "boat": (230, 230, 240),
}


def doodle_colour(label_set: LabelSet, class_id: int) -> tuple[int, int, int]:
    """The colour the studio paints ``class_id`` with: DOODLE_COLOURS by name, else the palette's."""
    return DOODLE_COLOURS.get(label_set.name_of(class_id), tuple(int(v) for v in label_set.palette[class_id]))


def by_class_count(n: int) -> str | None:
    """The label set a model with ``n`` classes predicts (ADE20K also as 151: TensorFlow's DeepLab
    puts an 'other' class 0 before its 150), or None when no set has that many."""
    for name in LABEL_SETS:
        if len(get(name)) == n or (name == "ade20k" and n == len(get(name)) + 1):
            return name
    return None


def mapping(src: LabelSet, dst: LabelSet) -> np.ndarray:
    """A 256-entry uint8 lookup table taking src ids to dst ids by class name.

    Exact names and aliases first, then synonyms, then the fallback list; classes with no
    counterpart map to 255 (unknown), as does 255 itself.
    """
    lut = np.full(256, UNKNOWN, np.uint8)
    for idx, names in enumerate(src.names):
        synonyms = [syn for n in names for syn in _synonyms(n)]
        for candidate in [*names, *synonyms, *_FALLBACKS.get(names[0], [])]:
            hit = dst.aliases.get(name_key(candidate))
            if hit is not None:
                lut[idx] = hit
                break
    if src.name == "voc":  # VOC background means "no object here", never a class of its own
        lut[0] = UNKNOWN
    return lut


def parse_rules(rules: str | None) -> list[tuple[str, str]]:
    """``SRC=DST[,SRC=DST...]`` -> [(src name, dst name)]; LabelError for malformed rules."""
    pairs = []
    for rule in (rules or "").split(","):
        if not rule.strip():
            continue
        if rule.count("=") != 1:
            raise LabelError(f"remap rule {rule.strip()!r} is not of the form SRC=DST (e.g. person=bear)")
        left, right = (part.strip() for part in rule.split("="))
        if not left or not right:
            raise LabelError(f"remap rule {rule.strip()!r} is missing a class name")
        pairs.append((left, right))
    return pairs


def check_rules(rules: str | None, label_set: str | None = None) -> None:
    """Syntax and class names of remap rules, before any model is loaded: with ``label_set``
    (the one the models will use, when known) every name must resolve in it (directly or by
    meaning); without it, some known set must have it."""
    for name in (n for pair in parse_rules(rules) for n in pair):
        if label_set is not None:
            get(label_set).nearest(name)
        elif not name.strip().isdigit() and not any(name_key(name) in get(s).aliases for s in LABEL_SETS):
            get("ade20k").id_of(name)  # raises, with suggestions from the default set


class RemapTable:
    """Remap rules ``SRC=DST[,SRC=DST...]`` compiled into a 256-entry uint8 lookup table.

    ``SRC`` names a class of ``src`` and ``DST`` a class of ``dst`` (the same set unless the
    segmenter and the generator use different ones, in which case ``bridge`` - the by-name
    mapping from one to the other - is applied first). A name the set lacks but another known
    set has maps to its nearest class by meaning; ``notes`` says where that happened.
    """

    def __init__(self, rules: str | None, src: LabelSet, dst: LabelSet | None = None) -> None:
        dst = dst or src
        self.src, self.dst = src, dst
        self.lut = mapping(src, dst) if dst is not src else np.arange(256, dtype=np.uint8)
        self.rules: list[tuple[int, int]] = []
        self.notes: list[str] = []
        for left, right in parse_rules(rules):
            (s, note_s), (d, note_d) = src.nearest(left), dst.nearest(right)
            self.notes += [n for n in (note_s, note_d) if n]
            self.lut[s] = d
            self.rules.append((s, d))

    def __bool__(self) -> bool:
        return bool(self.rules)

    def __call__(self, labels: np.ndarray) -> np.ndarray:
        return self.lut[labels]

    def describe(self) -> str:
        return ", ".join(f"{self.src.name_of(s)}={self.dst.name_of(d)}" for s, d in self.rules) or "none"


def colorize(labels: np.ndarray, label_set: LabelSet) -> np.ndarray:
    """H x W uint8 ids -> H x W x 3 uint8 RGB using the set's palette."""
    return label_set.palette[labels]


def class_fractions(labels: np.ndarray) -> dict[int, float]:
    """Pixel fraction of every id present, largest first."""
    counts = np.bincount(labels.ravel(), minlength=256)
    total = counts.sum() or 1
    order = np.argsort(-counts)
    return {int(i): counts[i] / total for i in order if counts[i]}
