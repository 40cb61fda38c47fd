"""CUDA through cuda-python (``cuda.bindings.runtime``), imported only when called.

Every call goes through ``check``, which turns a cudaError_t into a BackendError whose one
line says what failed and what to do (no GPU, driver too old, out of memory, ...).

Ownership: each buffer, stream and event is freed by whoever created it, through
``close()`` (or ``with``); none is thread-safe, and each belongs to the thread that uses it.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np

from segsynth.core.errors import BackendError

_HINTS = {
    "cudaErrorNoDevice": "no CUDA GPU is visible here (check nvidia-smi and CUDA_VISIBLE_DEVICES)",
    "cudaErrorInsufficientDriver": "the NVIDIA driver is missing or older than this CUDA runtime needs",
    "cudaErrorMemoryAllocation": "out of GPU memory: use a smaller --batch or --size, or free the GPU",
    "cudaErrorInvalidDevice": "that GPU index does not exist",
    "cudaErrorLaunchFailure": "a kernel failed; the GPU context is unusable until the process restarts",
}


def runtime():
    try:
        # imported here: cuda-python is optional (GPU machines)
        from cuda.bindings import runtime as cudart
    except ImportError as exc:
        raise BackendError("CUDA backends need cuda-python: pip install 'segsynth[gpu]'") from exc
    return cudart


def check(result, what: str):
    """Unpack a cuda-python result tuple, raising BackendError on failure."""
    cudart = runtime()
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        _, name = cudart.cudaGetErrorName(err)
        _, text = cudart.cudaGetErrorString(err)
        name, text = name.decode(), text.decode()
        raise BackendError(f"CUDA error in {what}: {_HINTS.get(name, text)} ({name})")
    return values[0] if len(values) == 1 else tuple(values) if values else None


@dataclass(frozen=True)
class Device:
    index: int
    name: str
    compute_capability: tuple[int, int]
    memory_bytes: int


def device(index: int = 0) -> Device:
    cudart = runtime()
    count = check(cudart.cudaGetDeviceCount(), "cudaGetDeviceCount")
    if count == 0:
        raise BackendError("no CUDA GPU is visible here (check nvidia-smi and CUDA_VISIBLE_DEVICES)")
    if index >= count:
        raise BackendError(f"GPU {index} does not exist ({count} visible)")
    props = check(cudart.cudaGetDeviceProperties(index), "cudaGetDeviceProperties")
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return Device(index, name.strip("\x00 "), (props.major, props.minor), int(props.totalGlobalMem))


def driver_mismatch(driver_version: int, bindings_version: str) -> str | None:
    """Why cuda-python cannot use this driver, or None: cuda-python N.x needs a driver for
    CUDA N (cuda-python>=12.3 installs 13.x, which a CUDA 12 driver refuses)."""
    driver_major, bindings_major = driver_version // 1000, int(bindings_version.split(".")[0])
    if driver_version <= 0 or bindings_major <= driver_major:
        return None
    return (f"the NVIDIA driver supports CUDA {driver_major}.{driver_version % 1000 // 10} but cuda-python "
            f"{bindings_version} needs CUDA {bindings_major}: pip install 'cuda-python=={driver_major}.*'")


def gpu_problem() -> str | None:
    """None when cuda-python sees a GPU, else why not in one line; never raises."""
    try:
        cudart = runtime()
        err, count = cudart.cudaGetDeviceCount()
        if int(err) == 0:
            return None if count > 0 else _HINTS["cudaErrorNoDevice"]
        _, driver = cudart.cudaDriverGetVersion()
        if not driver:
            return "no NVIDIA driver is installed here"
        # imported here: cuda-python is optional (GPU machines)
        from cuda import bindings

        _, name = cudart.cudaGetErrorName(err)
        return driver_mismatch(driver, bindings.__version__) or _HINTS.get(name.decode(), name.decode())
    except Exception as exc:  # noqa: BLE001 - any failure means "no GPU", said in the line
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def gpu_available() -> bool:
    """True when cuda-python is installed and sees at least one GPU; never raises."""
    return gpu_problem() is None


class PinnedBuffer:
    """Page-locked host memory (fast, asynchronous copies) exposed as a numpy array."""

    def __init__(self, shape: tuple[int, ...], dtype) -> None:
        cudart = runtime()
        self.nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        self.ptr = check(cudart.cudaHostAlloc(max(1, self.nbytes), cudart.cudaHostAllocDefault), "cudaHostAlloc")
        raw = (ctypes.c_byte * max(1, self.nbytes)).from_address(int(self.ptr))
        self.array = np.frombuffer(raw, dtype=dtype, count=int(np.prod(shape))).reshape(shape)

    def close(self) -> None:
        if self.ptr is not None:
            self.array = None
            check(runtime().cudaFreeHost(self.ptr), "cudaFreeHost")
            self.ptr = None


class PinnedPool:
    """An allocator of page-locked arrays (``pool(shape, dtype)``) that frees them all in
    ``close()``; ``address(array)`` says whether an array lies in one of them."""

    def __init__(self, on_close=None) -> None:
        self.buffers: list[PinnedBuffer] = []
        self.on_close = on_close

    def __call__(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        buf = PinnedBuffer(shape, dtype)
        self.buffers.append(buf)
        return buf.array

    def address(self, array: np.ndarray) -> int | None:
        """The host address of ``array`` when it is C-contiguous and inside one of this pool's
        buffers (so the GPU can read it directly, asynchronously), else None."""
        if not array.flags.c_contiguous:
            return None
        start = array.__array_interface__["data"][0]
        for buf in self.buffers:
            if buf.ptr is not None and int(buf.ptr) <= start and start + array.nbytes <= int(buf.ptr) + buf.nbytes:
                return start
        return None

    def close(self) -> None:
        for buf in self.buffers:
            buf.close()
        self.buffers = []
        if self.on_close is not None:
            self.on_close(self)
            self.on_close = None


class DeviceBuffer:
    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.ptr = check(runtime().cudaMalloc(max(1, nbytes)), "cudaMalloc")

    def close(self) -> None:
        if self.ptr is not None:
            check(runtime().cudaFree(self.ptr), "cudaFree")
            self.ptr = None


class Stream:
    def __init__(self) -> None:
        cudart = runtime()
        self.handle = check(cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking), "cudaStreamCreate")

    def copy_to_device(self, dst: DeviceBuffer, src: PinnedBuffer | int, nbytes: int) -> None:
        """``src``: a PinnedBuffer or the address of page-locked memory (``PinnedPool.address``)."""
        cudart = runtime()
        ptr = src if isinstance(src, int) else src.ptr
        check(cudart.cudaMemcpyAsync(dst.ptr, ptr, nbytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice,
                                     self.handle), "cudaMemcpyAsync (host to device)")

    def copy_to_host(self, dst: PinnedBuffer, src: DeviceBuffer, nbytes: int) -> None:
        cudart = runtime()
        check(cudart.cudaMemcpyAsync(dst.ptr, src.ptr, nbytes, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost,
                                     self.handle), "cudaMemcpyAsync (device to host)")

    def synchronize(self) -> None:
        check(runtime().cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")

    def close(self) -> None:
        if self.handle is not None:
            check(runtime().cudaStreamDestroy(self.handle), "cudaStreamDestroy")
            self.handle = None


class Event:
    def __init__(self, timing: bool = True) -> None:
        cudart = runtime()
        flags = cudart.cudaEventDefault if timing else cudart.cudaEventDisableTiming
        self.handle = check(cudart.cudaEventCreateWithFlags(flags), "cudaEventCreate")

    def record(self, stream: Stream) -> None:
        check(runtime().cudaEventRecord(self.handle, stream.handle), "cudaEventRecord")

    def synchronize(self) -> None:
        check(runtime().cudaEventSynchronize(self.handle), "cudaEventSynchronize")

    def elapsed_ms(self, since: "Event") -> float:
        return float(check(runtime().cudaEventElapsedTime(since.handle, self.handle), "cudaEventElapsedTime"))

    def close(self) -> None:
        if self.handle is not None:
            check(runtime().cudaEventDestroy(self.handle), "cudaEventDestroy")
            self.handle = None
