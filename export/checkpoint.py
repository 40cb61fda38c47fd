"""Reading PyTorch checkpoint files with clear errors, and strict loading that says which
tensor disagrees with the architecture and how."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from segsynth.core.errors import ModelError


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``path`` (a bare state dict, or one under 'state_dict'/'model')."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # zip/pickle/EOF errors from truncated or foreign files
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{path}: not a readable PyTorch checkpoint ({text[:200]})") from exc
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path}: does not hold a state dict of tensors")
    return dict(state)


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], source: str, hint: str = "") -> None:
    """``module.load_state_dict(state, strict=True)`` with a one-line explanation on mismatch."""
    expected = module.state_dict()
    for key, tensor in state.items():
        if key in expected and expected[key].shape != tensor.shape:
            raise ModelError(f"{source}: tensor {key} has shape {tuple(tensor.shape)} in the checkpoint but "
                             f"{tuple(expected[key].shape)} in the network built{hint}")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
        unexpected = [k for k in state if k not in expected]
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        detail = "; ".join(parts) or str(exc).splitlines()[0]
        raise ModelError(f"{source}: the checkpoint does not match the network built{hint}: {detail}") from exc
