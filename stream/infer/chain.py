"""The runtime chain: a ModelSet's segmenter(s), the remap table and the generator composed
into one ONNX graph when the models are loaded, so a GPU backend takes each batch up once
as uint8 frames and gives back labels and pictures. Normalisation, the fusing of two
segmenters, the remap and the letterbox run on the device, and the label maps never go to
the host and back between the models.

Inputs: ``frames`` N x H x W x 3 uint8 (at the segmenter's size) and ``remap`` (256,) uint8
(the session's table: it changes without rebuilding anything); with a generator, ``rows``
(gh,) and ``cols`` (gw,) int32 (``letterbox_indices``: the label-map row and column each
generator pixel reads, H or W for the dontcare padding) and, for VAE generators, ``z``
N x z_dim float32. Outputs: ``labels`` N x H x W uint8 (remapped ids) and, with a
generator, ``pixels`` N x gh x gw x 3 uint8. The arithmetic is the host path's, op for op
(``OnnxSegmenter.submit``, ``FusedSegmenter.finish``, ``Synthesize._complete``,
``Generator.__call__``), and uint8 exists only at the graph's edges (TensorRT-parsable: see
``engine.graphcheck``).

A session that works on the labels between the models (``--stabilize``) runs two parts
instead (``compose(..., part=)``): ``segment`` (``frames`` -> ``ids``, the segmenter's own,
not remapped, + ``confidence``) and ``synth`` (``ids`` + the rest of the inputs above ->
``labels`` + ``pixels``); the frames still go up once, as uint8, and only the label maps
come back and go up again.

Only the composition needs onnx; the composed graph is written once into the cache
(keyed by the models' bytes and the part) and run by any backend like any other graph.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from segsynth.core import labels, onnxmeta
from segsynth.core.errors import ModelError
from segsynth.engine.cache import CachedFile, content_key
from segsynth.engine.select import open_runner

log = logging.getLogger("segsynth")
F32, U8, I32 = 1, 2, 6
MIN_OPSET = 13  # Unsqueeze axes, Pad pads and Clip bounds as inputs
VERSION = "chain-v2"  # part of the cache key: bump when compose() changes what it writes


def nearest_indices(n_src: int, n_dst: int) -> np.ndarray:
    """Nearest-neighbour source index of each of ``n_dst`` positions (pixel centres), as
    ``segmenter.resize_labels`` picks them."""
    return ((np.arange(n_dst) + 0.5) * n_src / n_dst).astype(np.int32)


def letterbox_indices(seg_size: tuple[int, int], gen_size: tuple[int, int],
                      box: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``rows`` and ``cols`` for the chain: a label map of ``seg_size`` (W, H) resized into
    ``box`` (x, y, w, h) of a ``gen_size`` (W, H) canvas; outside the box they point at the
    padding row/column (index H / W)."""
    (w, h), (gw, gh), (x, y, cw, ch) = seg_size, gen_size, box
    rows, cols = np.full(gh, h, np.int32), np.full(gw, w, np.int32)
    rows[y:y + ch] = nearest_indices(h, ch)
    cols[x:x + cw] = nearest_indices(w, cw)
    return rows, cols


class _Graph:
    """The chain being assembled: nodes in execution order, constants, the opset."""

    def __init__(self, opset: int) -> None:
        self.nodes, self.constants, self.opset = [], [], opset

    def const(self, array) -> str:
        name = f"chain/const_{len(self.constants)}"
        self.constants.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], out: str | None = None, **attrs) -> str:
        n = len(self.nodes)
        out = out or f"chain/{op_type.lower()}_{n}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=f"chain/{op_type}_{n}", **attrs))
        return out

    def absorb(self, model, prefix: str):
        """Append ``model``'s nodes and weights (at this graph's opset) with every name
        prefixed; returns the prefixed model."""

        if _opset(model) != self.opset:
            model = onnx.version_converter.convert_version(model, self.opset)
        part = onnx.compose.add_prefix(model, prefix)
        self.nodes.extend(part.graph.node)
        self.constants.extend(part.graph.initializer)
        return part


def _fixed_batch(model, name: str) -> int | None:
    """The first dimension of input ``name`` when the graph fixes it, else None."""
    dim = next(i for i in model.graph.input if i.name == name).type.tensor_type.shape.dim[0]
    return dim.dim_value or None


def _opset(model) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _segmenter(g: _Graph, seg, model, prefix: str) -> tuple[str, str | None]:
    """One segmenter (an ``OnnxSegmenter``) fed from ``frames``: its int32 label ids and its
    ``confidence`` output (None when the graph has none)."""

    x = g.op("Cast", ["frames"], to=F32)
    if seg.bgr:
        x = g.op("Gather", [x, g.const(np.array([2, 1, 0], np.int64))], axis=3)
    x = g.op("Transpose", [x], perm=[0, 3, 1, 2])
    x = g.op("Mul", [x, g.const(seg.scale)])
    g.op("Add", [x, g.const(seg.offset)], out=prefix + seg.input_name)
    part = g.absorb(model, prefix)
    confidence = prefix + "confidence" if any(o.name == "confidence" for o in model.graph.output) else None
    out = prefix + seg.output_name
    if seg.output_name == "logits":
        return g.op("Cast", [g.op("ArgMax", [out], axis=1, keepdims=0)], to=I32), confidence
    last = next(n for n in part.graph.node if out in n.output)
    if last.op_type == "Cast" and next(a.i for a in last.attribute if a.name == "to") == U8:
        inferred = onnx.shape_inference.infer_shapes(part).graph
        types = {v.name: v.type.tensor_type.elem_type for v in (*inferred.value_info, *inferred.input)}
        if types.get(last.input[0]) == I32:  # the graph's own int32 ids, before its uint8 edge
            g.nodes.remove(last)
            return last.input[0], confidence
    return g.op("Cast", [out], to=I32), confidence


def _needed(nodes: list, outputs: list[str]) -> list:
    """``nodes`` without those no output depends on (e.g. a confidence branch the chain does
    not give out), order kept."""
    wanted, kept = set(outputs), []
    for node in reversed(nodes):
        if wanted & set(node.output):
            kept.append(node)
            wanted.update(i for i in node.input if i)
    return kept[::-1]


PARTS = ("all", "segment", "synth")


def compose(segmenter, generator=None, part: str = "all"):
    """The chain of ``segmenter`` (an ``OnnxSegmenter``, or a ``FusedSegmenter`` of two, with
    ``path``s) and ``generator`` (a ``Generator`` with ``path``, or None) as a ModelProto.
    ``part``: ``all`` (frames -> labels [+ pixels]); ``segment`` (frames -> ``ids``, the
    segmenter's own ids, not remapped, + ``confidence`` where the segmenters give one), for
    work on the host between the models; ``synth`` (``ids`` uint8 N x H x W -> labels +
    pixels, the rest of ``all``)."""

    if part not in PARTS:
        raise ValueError(f"unknown chain part {part!r}")
    parts = [segmenter.scene, segmenter.objects] if hasattr(segmenter, "scene") else [segmenter]
    models = [onnx.load(str(p.path)) for p in parts] if part != "synth" else []
    gen_model = onnx.load(str(generator.path)) if generator is not None and part != "segment" else None
    fixed = {_fixed_batch(m, p.input_name) for m, p in zip(models, parts)}
    if gen_model is not None:
        fixed.add(_fixed_batch(gen_model, "label"))
    fixed.discard(None)
    if len(fixed) > 1:
        raise ModelError(f"the models take fixed batches of different sizes ({', '.join(map(str, sorted(fixed)))})")
    batch: int | str = fixed.pop() if fixed else "N"
    w, h = segmenter.size
    g = _Graph(max(MIN_OPSET, *(_opset(m) for m in (*models, *([gen_model] if gen_model else ())))))
    inputs, outputs = [], []
    if part == "synth":
        seg_ids = g.op("Cast", ["ids"], to=I32)
        inputs.append(helper.make_tensor_value_info("ids", U8, [batch, h, w]))
    else:
        found = [_segmenter(g, p, m, f"{role}/") for role, p, m in zip(("scene", "objects"), parts, models)]
        seg_ids, confidence = found[0]
        if len(found) == 2:  # object pixels painted over the scene, their ids bridged into its label set
            painted = g.op("Gather", [g.const(segmenter.bridge.astype(np.int32)), found[1][0]], axis=0)
            known = g.op("Not", [g.op("Equal", [painted, g.const(np.array(labels.UNKNOWN, np.int32))])])
            seg_ids = g.op("Where", [known, painted, seg_ids])
            confidence = g.op("Where", [known, found[1][1], confidence]) if found[1][1] and confidence else None
        inputs.append(helper.make_tensor_value_info("frames", U8, [batch, h, w, 3]))
        if part == "segment":
            g.op("Cast", [seg_ids], out="ids", to=U8)
            outputs.append(helper.make_tensor_value_info("ids", U8, [batch, h, w]))
            if confidence is not None:
                g.op("Identity", [confidence], out="confidence")
                outputs.append(helper.make_tensor_value_info("confidence", F32, [batch, h, w]))
    if part != "segment":
        remapped = g.op("Gather", [g.op("Cast", ["remap"], to=I32), seg_ids], axis=0)
        g.op("Cast", [remapped], out="labels", to=U8)
        inputs.append(helper.make_tensor_value_info("remap", U8, [256]))
        outputs.append(helper.make_tensor_value_info("labels", U8, [batch, h, w]))
    if gen_model is not None:
        gw, gh = generator.size
        declared = {i.name: i.type.tensor_type for i in gen_model.graph.input}
        padded = g.op("Pad", [remapped, g.const(np.array([0, 0, 0, 0, 1, 1], np.int64)),
                              g.const(np.array(labels.UNKNOWN, np.int32))], mode="constant")
        canvas = g.op("Gather", [g.op("Gather", [padded, "rows"], axis=1), "cols"], axis=2)
        canvas = g.op("Cast", [g.op("Unsqueeze", [canvas, g.const(np.array([1], np.int64))])],
                      to=declared["label"].elem_type)
        for name in ("label", "instance") if generator.uses_instance else ("label",):
            g.op("Identity", [canvas], out=f"generator/{name}")
        inputs += [helper.make_tensor_value_info("rows", I32, [gh]), helper.make_tensor_value_info("cols", I32, [gw])]
        if generator.uses_z:
            g.op("Identity", ["z"], out="generator/z")
            inputs.append(helper.make_tensor_value_info("z", F32, [batch, generator.z_dim]))
        g.absorb(gen_model, "generator/")
        x = g.op("Mul", [g.op("Add", ["generator/image", g.const(np.float32(1))]), g.const(np.float32(127.5))])
        x = g.op("Clip", [g.op("Round", [x]), g.const(np.float32(0)), g.const(np.float32(255))])
        g.op("Cast", [g.op("Transpose", [x], perm=[0, 2, 3, 1])], out="pixels", to=U8)
        outputs.append(helper.make_tensor_value_info("pixels", U8, [batch, gh, gw, 3]))
    nodes = _needed(g.nodes, [o.name for o in outputs])
    used = {i for n in nodes for i in n.input}
    graph = helper.make_graph(nodes, f"segsynth-chain-{part}", inputs, outputs,
                              [c for c in g.constants if c.name in used])
    ir = max([7, *(m.ir_version for m in (*models, *([gen_model] if gen_model else ())))])
    chain = helper.make_model(graph, opset_imports=[helper.make_opsetid("", g.opset)], ir_version=ir,
                              producer_name="segsynth")
    helper.set_model_props(chain, {onnxmeta.ROLE: "chain", onnxmeta.CHAIN_PART: part,
                                   onnxmeta.LABEL_SET: segmenter.label_set.name})
    return chain


def write_chain(segmenter, generator, cache_dir: Path, part: str = "all") -> Path:
    """The composed graph in ``cache_dir/chains`` (made once: engine.cache.CachedFile; keyed by
    the parts' bytes, the part and this module's version)."""
    parts = [segmenter.scene, segmenter.objects] if hasattr(segmenter, "scene") else [segmenter]
    models = [Path(m.path) for m in (*parts, *([generator] if generator is not None else ()))]

    def make(tmp: Path) -> None:
        try:
            model = compose(segmenter, generator, part)
        except Exception as exc:  # onnx's converter and checker raise many types; one line says it
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"the models cannot be composed into one graph ({first})") from exc
        tmp.write_bytes(model.SerializeToString())

    return CachedFile(cache_dir / "chains" / f"chain-{part}-{content_key(f'{VERSION} {part}', *models)}.onnx")(make)


class Chain:
    """A chain graph on one runner. ``submit`` a batch (uint8 ``frames``, or ``ids`` for the
    synth part) with a session's remap table, letterbox boxes and z (what the part takes);
    ``finish`` gives the graph's outputs by name (``labels`` [+ ``pixels``], or ``ids`` [+
    ``confidence``]). Shareable between sessions like the models (state per call only)."""

    def __init__(self, runner, segmenter, generator=None) -> None:
        self.runner = runner
        self.part = runner.metadata.get(onnxmeta.CHAIN_PART, "all")
        self.size, self.label_set = segmenter.size, segmenter.label_set
        self.gen_size = generator.size if generator is not None and self.part != "segment" else None
        self.uses_z = self.gen_size is not None and generator.uses_z
        self.asynchronous = runner.name in ("tensorrt", "torch-cuda")  # submit() returns before the work is done
        self.input = "ids" if self.part == "synth" else "frames"
        batch = runner.inputs[self.input].shape[0]
        self.batch = batch if isinstance(batch, int) else runner.max_batch  # frames per call; None: any
        self.source = getattr(runner, "label", runner.name)

    @property
    def confidence(self) -> bool:
        return "confidence" in self.runner.outputs

    def submit(self, x: np.ndarray, lut: np.ndarray | None = None,
               boxes: list[tuple[int, int, int, int]] | None = None, z: np.ndarray | None = None):
        """Start N frames (N x H x W x 3) or id maps (N x H x W), uint8; ``boxes``: where each
        frame's picture lies on the generator's canvas (frames of one box run together)."""
        handles, start = [], 0
        while start < len(x):
            end = start + 1
            while end < len(x) and (self.gen_size is None or boxes[end] == boxes[start]) \
                    and (self.batch is None or end - start < self.batch):
                end += 1
            feed = {self.input: x[start:end]}
            if self.part != "segment":
                feed["remap"] = lut
            if self.gen_size is not None:
                feed["rows"], feed["cols"] = letterbox_indices(self.size, self.gen_size, boxes[start])
            if self.uses_z:
                feed["z"] = np.repeat(z, end - start, 0).astype(np.float32, copy=False)
            handles.append(self.runner.submit(feed))
            start = end
        return handles

    def finish(self, handles) -> dict[str, np.ndarray]:
        outs = [self.runner.wait(h) for h in handles]
        return {name: np.concatenate([o[name] for o in outs]) for name in outs[0]}

    def pinned_allocator(self):
        return self.runner.pinned_allocator()

    def close(self) -> None:
        self.runner.deactivate()


def load_chain(segmenter, generator, *, backend: str, cache_dir: Path, part: str = "all", **options) -> Chain:
    """The chain (``part``) of the loaded models on ``backend`` (``options``: open_runner's
    fp16, threads, batch)."""
    path = write_chain(segmenter, generator, cache_dir, part)
    runner = open_runner(path, backend, cache_dir=cache_dir, **options)
    try:
        return Chain(runner, segmenter, generator)
    except BaseException:
        runner.deactivate()
        raise
