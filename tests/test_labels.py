import numpy as np
import pytest

from segsynth.core import labels
from segsynth.core.errors import LabelError


def test_label_sets_have_the_published_sizes_and_spade_ids():
    ade, voc, coco, city = (labels.get(n) for n in ("ade20k", "voc", "coco-stuff", "cityscapes"))
    assert (len(ade), len(voc), len(coco), len(city)) == (150, 21, 182, 19)
    # SPADE's 0-based ADE20K ids (objectInfo150 order minus one) and COCO-Stuff ids (cocostuff id - 1)
    assert ade.id_of("wall") == 0 and ade.id_of("person") == 12 and ade.id_of("flag") == 149
    assert coco.id_of("person") == 0 and coco.id_of("wood") == 181 and coco.id_of("bear") == 22
    assert voc.id_of("person") == 15 and city.id_of("road") == 0 and city.id_of("bicycle") == 18
    assert ade.id_of("unknown") == labels.UNKNOWN


@pytest.mark.parametrize("text", ["Person", "  person ", "PERSON", "individual"])
def test_lookup_is_case_and_space_tolerant_and_knows_aliases(text):
    assert labels.get("ade20k").id_of(text) == 12


def test_lookup_tolerates_separators_and_other_suffixes():
    coco = labels.get("coco-stuff")
    assert coco.id_of("Traffic_Light") == coco.id_of("traffic light") == 9
    assert coco.id_of("sky") == coco.id_of("sky-other") == 156
    assert labels.get("voc").id_of("dining table") == 11
    assert labels.get("voc").id_of("tv") == 20


def test_typo_gives_suggestions():
    with pytest.raises(LabelError) as err:
        labels.get("ade20k").id_of("preson")
    assert "did you mean" in str(err.value) and "person" in str(err.value)
    with pytest.raises(LabelError, match="refrigerator"):
        labels.get("coco-stuff").id_of("refridgerator")


def test_unknown_label_set_lists_the_choices():
    with pytest.raises(LabelError, match="ade20k, voc, coco-stuff, cityscapes"):
        labels.get("imagenet")


def test_voc_to_ade20k_mapping_by_name():
    voc, ade = labels.get("voc"), labels.get("ade20k")
    lut = labels.mapping(voc, ade)
    assert lut[voc.id_of("background")] == labels.UNKNOWN  # background paints nothing
    assert lut[voc.id_of("person")] == ade.id_of("person")
    assert lut[voc.id_of("car")] == ade.id_of("car")
    for animal in ("dog", "cat", "horse", "sheep", "cow", "bird"):
        assert lut[voc.id_of(animal)] == ade.id_of("animal")
    assert lut[voc.id_of("aeroplane")] == ade.id_of("airplane")
    assert lut[voc.id_of("motorbike")] == ade.id_of("minibike")
    assert lut[voc.id_of("tvmonitor")] == ade.id_of("television")
    assert lut[labels.UNKNOWN] == labels.UNKNOWN


def test_mappings_into_coco_stuff():
    coco = labels.get("coco-stuff")
    voc_lut = labels.mapping(labels.get("voc"), coco)
    assert voc_lut[15] == coco.id_of("person") and voc_lut[12] == coco.id_of("dog")
    assert voc_lut[18] == coco.id_of("couch") and voc_lut[11] == coco.id_of("dining table")
    ade = labels.get("ade20k")
    ade_lut = labels.mapping(ade, coco)
    assert ade_lut[ade.id_of("sky")] == coco.id_of("sky-other")
    assert ade_lut[ade.id_of("sidewalk")] == coco.id_of("pavement")  # via ADE's full name
    assert ade_lut[ade.id_of("tree")] == coco.id_of("tree")
    mapped = (ade_lut[:150] != labels.UNKNOWN).mean()
    assert mapped > 0.85, f"only {mapped:.0%} of ADE20K classes reach COCO-Stuff"


def test_remap_rules_compile_to_a_lookup_table():
    ade = labels.get("ade20k")
    table = labels.RemapTable("person=animal, car = refrigerator", ade)
    assert table.lut.dtype == np.uint8 and table.lut.shape == (256,)
    assert table.lut[12] == ade.id_of("animal") and table.lut[20] == ade.id_of("refrigerator")
    untouched = [i for i in range(256) if i not in (12, 20)]
    assert (table.lut[untouched] == np.array(untouched)).all()
    label_map = np.array([[12, 0], [20, 255]], np.uint8)
    assert table(label_map).tolist() == [[ade.id_of("animal"), 0], [ade.id_of("refrigerator"), 255]]
    assert table.describe() == "person=animal, car=refrigerator"


def test_remap_across_label_sets_bridges_by_name_first():
    voc, coco = labels.get("voc"), labels.get("coco-stuff")
    table = labels.RemapTable("person=bear", voc, coco)
    assert table.lut[15] == coco.id_of("bear")
    assert table.lut[7] == coco.id_of("car")  # unmapped classes still bridged by name


@pytest.mark.parametrize("rules, message", [
    ("person", "not of the form SRC=DST"),
    ("person=", "missing a class name"),
    ("a=b=c", "not of the form"),
    ("persn=animal", "did you mean: person"),
    ("person=wombat", "unknown class 'wombat' in label set ade20k"),
])
def test_bad_remap_rules(rules, message):
    with pytest.raises(LabelError, match=message):
        labels.RemapTable(rules, labels.get("ade20k"))


def test_a_class_of_another_set_maps_to_its_nearest_by_meaning():
    ade, voc = labels.get("ade20k"), labels.get("voc")
    table = labels.RemapTable("person=bear, giraffe=car", ade)  # COCO-Stuff has bear and giraffe, ADE20K neither
    assert table.lut[ade.id_of("person")] == ade.id_of("animal") and table.lut[ade.id_of("animal")] == ade.id_of("car")
    assert table.notes == ["'bear' is not a class of ade20k (coco-stuff has it); using its nearest class 'animal'",
                           "'giraffe' is not a class of ade20k (coco-stuff has it); using its nearest class 'animal'"]
    with pytest.raises(LabelError, match="class 'bear' .coco-stuff. has no counterpart in voc"):
        labels.RemapTable("person=bear", voc)
    assert labels.RemapTable("person=animal", ade).notes == []


def test_palettes_are_stable_and_distinct():
    voc = labels.get("voc").palette
    assert tuple(voc[15]) == (192, 128, 128) and tuple(voc[1]) == (128, 0, 0)  # the standard VOC map
    assert tuple(labels.get("cityscapes").palette[0]) == (128, 64, 128)
    for name in ("ade20k", "coco-stuff"):
        ls = labels.get(name)
        pal = ls.palette[: len(ls)].astype(float)
        dists = np.linalg.norm(pal[:, None] - pal[None], axis=-1) + np.eye(len(ls)) * 1e9
        assert dists.min() > 20, f"{name} has two nearly identical colours"
        assert (labels._distinct_palette(len(ls)) == ls.palette).all()  # recomputed identically
        assert tuple(ls.palette[labels.UNKNOWN]) == (0, 0, 0)
