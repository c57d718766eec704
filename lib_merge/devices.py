"""Which device a merge runs on, given what the user or the WebUI asked for.

Rules, and why:

- The index is kept: ``cuda:1`` stays ``cuda:1`` (a WebUI started with
  ``--device-id 1`` runs its model there; merging on ``cuda:0`` would fill the
  wrong card).  Plain ``cuda`` means the current device.
- ROCm builds of torch present AMD GPUs as ``cuda`` and take the CUDA path.
- Other accelerators (``mps`` on a Mac, ``xpu`` on Intel, DirectML's
  ``privateuseone``, ``npu``...) merge on the CPU until they are tested: the
  DARE mask hash uses in-place right shifts that torch < 2.5 only runs on MPS
  through the CPU fallback, MPS shift ops had correctness bugs in torch
  2.5-2.7, and ``bincount`` with few bins (the trim's radix select) is
  pathologically slow on MPS.  The result is identical either way (the CPU is
  the reference), the WebUI's hot-load still moves it onto its own device, and
  :attr:`MergeDevice.note` says so for the status line.
- ``cuda`` asked for where CUDA is unusable falls back to the CPU with a note
  (the tab and the HTTP route refuse an explicit ``cuda`` themselves).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .compat import cuda_ready
from .errors import ParameterError

#: Device types the merge kernels are tested on.
TESTED_TYPES = ("cpu", "cuda")


@dataclass(frozen=True)
class MergeDevice:
    """The device a merge runs on, what was asked for, and why they differ (empty when they do not)."""

    device: str
    requested: str
    note: str = ""

    @property
    def type(self) -> str:
        return torch.device(self.device).type

    @property
    def is_cuda(self) -> bool:
        return self.type == "cuda"


def parse_device(text: str | torch.device) -> torch.device:
    """``torch.device`` of a user's device string; one clear error for nonsense (no traceback)."""
    try:
        return torch.device(str(text).strip())
    except (RuntimeError, ValueError) as exc:
        raise ParameterError(f"unknown device {str(text)!r}; use cpu, cuda or cuda:N "
                             f"({str(exc).splitlines()[0][:120]})") from None


def resolve_merge_device(requested: str | torch.device | None = None,
                         webui_device: str | torch.device | None = None) -> MergeDevice:
    """The device to merge on.

    ``requested`` is the user's choice: ``None``/``"auto"`` means the WebUI's
    device (``webui_device``) when there is one, else CUDA when available,
    else the CPU.  See the module doc for the rules.
    """
    asked = "auto" if requested is None or str(requested).strip() in ("", "auto") else str(requested).strip()
    if asked == "auto":
        if webui_device is not None and str(webui_device).strip():
            target = parse_device(webui_device)
        else:
            target = torch.device("cuda") if cuda_ready() else torch.device("cpu")
    else:
        target = parse_device(asked)
    if target.type == "cpu":
        return MergeDevice("cpu", asked)
    if target.type == "cuda":
        if not cuda_ready():
            return MergeDevice("cpu", asked, f"merging on the CPU: {target} was asked for but CUDA is not "
                                              "available to this torch")
        count = torch.cuda.device_count()
        if target.index is not None and target.index >= count:
            return MergeDevice("cpu", asked, f"merging on the CPU: {target} was asked for but this machine has "
                                              f"{count} CUDA device{'s' if count != 1 else ''}")
        return MergeDevice(str(target), asked)
    return MergeDevice("cpu", asked, f"merging on the CPU: the DARE/TIES kernels are not tested on {target.type} "
                                      f"({target}) yet; the result is the same and hot-load still puts it on "
                                      f"{target}")


def accelerator_name(device: str | torch.device) -> str:
    """A human name for the device (``NVIDIA GeForce RTX 3060, 12.0 GB``), for reports."""
    dev = torch.device(device)
    if dev.type != "cuda" or not cuda_ready():
        return str(dev)
    try:
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        kind = "ROCm" if getattr(torch.version, "hip", None) else "CUDA"
        return f"{props.name}, {props.total_memory / 2**30:.1f} GiB ({kind} device {index})"
    except Exception:
        return str(dev)


__all__ = ["MergeDevice", "resolve_merge_device", "parse_device", "accelerator_name", "TESTED_TYPES"]
