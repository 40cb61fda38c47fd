"""The ``segsynth.*`` metadata written into the ONNX graphs segsynth exports, and read back when it
loads them: each key named once, here, for the writers (export, the fused chain, quantize,
the TFLite conversion) and the readers (segmenters, generators, chains)."""

from __future__ import annotations

CALIBRATION = "segsynth.calibration"
CHAIN_PART = "segsynth.chain_part"
CLASSES = "segsynth.classes"
CONTAIN_DONTCARE_LABEL = "segsynth.contain_dontcare_label"
FAMILY = "segsynth.family"
FIT = "segsynth.fit"
FLOAT_SOURCE = "segsynth.float_source"
FRAME_SIZE = "segsynth.frame_size"
GENERATOR_LABEL_SET = "segsynth.generator_label_set"
INPUT_MEAN = "segsynth.input_mean"
INPUT_ORDER = "segsynth.input_order"
INPUT_SIZE = "segsynth.input_size"
INPUT_STD = "segsynth.input_std"
LABEL_NC = "segsynth.label_nc"
LABEL_SET = "segsynth.label_set"
NO_INSTANCE = "segsynth.no_instance"
QUANTIZED = "segsynth.quantized"
RECEPTIVE_RADIUS = "segsynth.receptive_radius"  # pixels: how far a label change reaches (students)
ROLE = "segsynth.role"
SEG_SIZE = "segsynth.seg_size"
SEGMENTER_LABEL_SET = "segsynth.segmenter_label_set"
SIZE = "segsynth.size"
SOURCE = "segsynth.source"
SOURCE_SHA256 = "segsynth.source_sha256"
USE_VAE = "segsynth.use_vae"
Z_DIM = "segsynth.z_dim"
Z_MEAN = "segsynth.z_mean"  # seeds are drawn from N(z_mean, z_std²), where a generator gives them
Z_STD = "segsynth.z_std"


def read(model) -> dict[str, str]:
    """An ONNX model's metadata (all of it, segsynth's keys among the rest)."""
    return {p.key: p.value for p in model.metadata_props}


def write(model, props: dict[str, str]) -> None:
    """Replace an ONNX model's metadata with ``props``."""
    del model.metadata_props[:]
    for key, value in props.items():
        model.metadata_props.add(key=key, value=str(value))
