import threading
import time

import numpy as np

from segsynth.stream.ring import FrameRing
from segsynth.stream.infer.stabilize import Majority


def test_lossless_ring_blocks_the_producer_and_keeps_order():
    ring = FrameRing(3, (2,), policy="lossless")
    got = []

    def consume():
        while True:
            slots = ring.take(2)
            if not slots:
                return
            got.extend(int(s.data[0]) for s in slots)
            time.sleep(0.01)
            ring.release(slots)

    t = threading.Thread(target=consume)
    t.start()
    for i in range(50):
        slot = ring.acquire()
        slot.data[:] = i
        ring.publish(slot)
    ring.close()
    t.join(5)
    assert got == list(range(50)) and ring.dropped == 0


def test_latest_ring_drops_the_oldest_and_never_blocks():
    ring = FrameRing(3, (1,), policy="latest")
    for i in range(10):  # nobody consumes: the producer still never waits
        slot = ring.acquire(timeout=0.5)
        assert slot is not None
        slot.data[:] = i
        ring.publish(slot)
    assert ring.dropped == 7
    assert [int(s.data[0]) for s in ring.take(10)] == [7, 8, 9]  # the newest frames survive


def test_ring_buffers_are_preallocated_once():
    ring = FrameRing(4, (8, 8, 3))
    ids = {id(s.data) for s in ring.slots}
    for _ in range(20):
        s = ring.acquire()
        ring.publish(s)
        ring.release(ring.take(1))
    assert {id(s.data) for s in ring.slots} == ids


def test_label_smoother_takes_the_majority_of_the_last_k_frames():
    smooth = Majority(3)
    a, b = np.zeros((2, 2), np.uint8), np.ones((2, 2), np.uint8)
    assert (smooth(a) == 0).all()
    assert (smooth(b) == 1).all()  # tie 1:1 -> the most recent
    flicker = a.copy()
    flicker[0, 0] = 7
    out = smooth(flicker)  # history a, b, flicker: pixel (0,0) votes 0,1,7 -> tie -> most recent (7)
    assert out[0, 0] == 7 and (out.ravel()[1:] == 0).all()  # elsewhere 0 wins 2:1
    out = smooth(b)  # history b, flicker, b
    assert out[0, 0] == 1 and (out == 1).all()


def test_letterbox_keeps_the_aspect_and_pads_with_dontcare():
    from segsynth.core import labels
    from segsynth.stream.infer.synth import Synthesize, content_box

    assert content_box((1280, 720), (64, 64)) == (0, 14, 64, 36)
    assert content_box((720, 1280), (64, 64)) == (14, 0, 36, 64)

    class FakeGenerator:  # stands in for the ONNX generator: records its input, paints ids as grey
        seen = None

        def __call__(self, ids, z):
            FakeGenerator.seen = ids
            return np.repeat(ids[..., None], 3, -1)

    class FakeSegmenter:  # "everything is a person", with the segmenter's two-phase interface
        def submit(self, frames):
            return len(frames)

        def finish(self, n):
            return np.full((n, 8, 8), 12, np.uint8)

    ade = labels.get("ade20k")
    segment = FakeSegmenter()
    for fit, pad_rows in (("letterbox", 14), ("stretch", 0)):
        infer = Synthesize(segment, FakeGenerator(), labels.RemapTable(None, ade), None, "off", fit, (64, 64))
        (result,) = infer(np.zeros((1, 8, 8, 3), np.uint8), [{"size": (1280, 720)}])
        canvas = FakeGenerator.seen[0]
        assert (canvas[:pad_rows] == labels.UNKNOWN).all() and (canvas[pad_rows:64 - pad_rows] == 12).all()
        assert result.synth.shape == (64 - 2 * pad_rows, 64, 3)  # only the content goes back to the frame


def test_pipeline_keeps_order_with_synchronous_and_asynchronous_infer_steps():
    from segsynth.stream.pipeline import Pipeline

    class ListSource:  # the unit under test is the pipeline: a list stands in for a decoder
        closed = False

        def frames(self, stop, audio):
            for i in range(23):
                yield np.full((2, 2, 3), i, np.uint8), {"index": i}

        def close(self):
            ListSource.closed = True

    class RecordingSink:
        def __init__(self):
            self.seen, self.closed = [], False

        def write(self, result, meta):
            assert result == meta["index"] * 10
            self.seen.append(meta["index"])

        def write_audio(self, item):
            raise AssertionError("no audio here")

        def close(self):
            self.closed = True

    class SyncInfer:
        def __call__(self, frames, metas):
            return [int(f[0, 0, 0]) * 10 for f in frames]

    class AsyncInfer(SyncInfer):  # submit() returns early; finish() completes, in order
        asynchronous = True

        def __init__(self):
            self.calls = []

        def submit(self, frames, metas):
            self.calls.append(("submit", metas[0]["index"]))
            return frames

        def finish(self, frames):
            self.calls.append(("finish", int(frames[0, 0, 0, 0])))
            return SyncInfer.__call__(self, frames, None)

    for infer in (SyncInfer(), AsyncInfer()):
        sink = RecordingSink()
        ListSource.closed = False
        stats = Pipeline(ListSource(), infer, sink, model_shape=(2, 2, 3), batch=4, ring_slots=5).run()
        assert sink.seen == list(range(23)) and sink.closed and ListSource.closed and stats.frames_out == 23
    # double buffering: batch k+1 is submitted before batch k is finished, every batch once, in order
    submitted = [i for kind, i in infer.calls if kind == "submit"]
    assert [i for kind, i in infer.calls if kind == "finish"] == submitted and len(submitted) >= 6
    expected = [("submit", submitted[0])] + [c for k, nxt in zip(submitted, submitted[1:])
                                             for c in (("submit", nxt), ("finish", k))]
    assert infer.calls == expected + [("finish", submitted[-1])]


def test_the_infer_stage_uploads_from_two_buffers_of_the_allocator_and_frees_them_last():
    """Batches are staged in turn into two buffers made by the runner's allocator (page-locked
    on GPUs) instead of fresh pageable arrays; a batch in flight keeps its buffer until it is
    finished, also when the run is aborted; the allocator is closed once, after the last batch."""
    from segsynth.stream.pipeline import Pipeline

    log = []

    class Allocator:  # numpy memory standing in for page-locked memory: the unit is the pipeline
        def __init__(self):
            self.buffers = []

        def __call__(self, shape, dtype):
            self.buffers.append(np.empty(shape, dtype))
            return self.buffers[-1]

        def close(self):
            log.append("close")

    class Source:
        def frames(self, stop, audio):
            for i in range(23):
                yield np.full((2, 2, 3), i, np.uint8), {"index": i}

        def close(self):
            pass

    class Sink:
        def write(self, result, meta):
            assert result == meta["index"]

        def write_audio(self, item):
            pass

        def close(self):
            pass

    class Infer:  # asynchronous: what the device would read is checked when the batch is finished
        asynchronous = True

        def __init__(self, allocator, abort_at=None):
            self.allocator, self.abort_at, self.pipeline = allocator, abort_at, None

        def submit(self, frames, metas):
            owner = [i for i, b in enumerate(self.allocator.buffers) if np.shares_memory(frames, b)]
            log.append(("submit", metas[0]["index"], owner))
            if self.abort_at is not None and metas[-1]["index"] >= self.abort_at:
                self.abort_at = None
                self.aborted_in = metas[0]["index"]
                self.pipeline.stop(drain=False)
            return frames, [m["index"] for m in metas]

        def finish(self, handle):
            frames, indexes = handle
            assert [int(f[0, 0, 0]) for f in frames] == indexes  # not overwritten while in flight
            log.append(("finish", indexes[0]))
            return indexes

    allocator = Allocator()
    Pipeline(Source(), Infer(allocator), Sink(), model_shape=(2, 2, 3), batch=4, allocator=allocator).run()
    assert [b.shape for b in allocator.buffers] == [(4, 2, 2, 3)] * 2
    owners = [entry[2] for entry in log if entry[0] == "submit"]  # (the decoder may hand over short batches)
    assert len(owners) >= 6 and owners == [[0], [1]] * (len(owners) // 2) + [[0]] * (len(owners) % 2)
    assert log[-1] == "close" and log.count("close") == 1

    log.clear()
    allocator = Allocator()
    infer = Infer(allocator, abort_at=8)
    infer.pipeline = pipeline = Pipeline(Source(), infer, Sink(), model_shape=(2, 2, 3), batch=4, allocator=allocator)
    pipeline.start()
    assert pipeline.join(30)
    assert log[-2:] == [("finish", infer.aborted_in), "close"]  # the batch in flight is finished, then freed
    assert not any(entry[0] == "submit" and entry[1] > infer.aborted_in for entry in log[:-1])
