"""What differs between the torch versions the WebUIs pin, in one place.

AUTOMATIC1111 1.10 pins torch 2.1.2 and Forge pins 2.3.1, while this project
is developed on a current torch.  Everything here exists in all of them or
has a fallback, so the rest of the library can use it without version checks:

- ``torch.OutOfMemoryError`` appeared in torch 2.4; 2.1-2.3 only have
  ``torch.cuda.OutOfMemoryError`` (the same class on 2.4+).  An ``except``
  naming the missing attribute raises ``AttributeError`` at the very moment
  a GPU runs out of memory, so handlers use :data:`OUT_OF_MEMORY_ERRORS`.
- ``torch.cuda.empty_cache()`` takes no device and frees the *current*
  device's cache; ``mem_get_info`` defaults to the current device too.  A
  merge on ``cuda:1`` must measure and free ``cuda:1``, so both go through
  :func:`empty_cache` and :func:`mem_get_info` with the merge device.
- Nothing here initialises CUDA in a process that has not used it: a CPU
  merge in a CUDA build must not create a CUDA context (hundreds of MB).

Audited against torch 2.1.2 (the oldest pinned): ``torch.dtype.itemsize``,
``torch.float8_e4m3fn``/``float8_e5m2``, ``torch.load(mmap=True,
weights_only=True)`` (all new in 2.1), ``torch.frombuffer``,
``torch.bitwise_right_shift(out=)``, ``torch.aminmax``, ``Tensor.view(dtype)``
between same-size dtypes, ``torch.cuda.mem_get_info(device)``,
``torch.cuda.max_memory_allocated``/``reset_peak_memory_stats`` and
``torch.cuda.set_per_process_memory_fraction`` exist there.  The library
uses no unsigned dtype wider than ``uint8`` (``uint16``-``uint64`` are 2.3+).
``nn.Module.register_load_state_dict_pre_hook`` is 2.5+: use
:func:`register_load_state_dict_pre_hook`.
"""
from __future__ import annotations

import re
from typing import Callable

import torch

TORCH_VERSION: tuple[int, int] = tuple(int(x) for x in re.findall(r"\d+", torch.__version__)[:2])  # type: ignore


def _oom_classes() -> tuple[type[BaseException], ...]:
    found: list[type[BaseException]] = []
    for owner, name in ((torch, "OutOfMemoryError"), (getattr(torch, "cuda", None), "OutOfMemoryError")):
        cls = getattr(owner, name, None) if owner is not None else None
        if isinstance(cls, type) and issubclass(cls, BaseException) and cls not in found:
            found.append(cls)
    return tuple(found) or (MemoryError,)


#: The exception classes torch raises when a device allocation fails (use in ``except``).
OUT_OF_MEMORY_ERRORS: tuple[type[BaseException], ...] = _oom_classes()

# Out-of-memory reported as a plain RuntimeError: MPS/XPU/ROCm allocators, cuBLAS/cuDNN workspaces.
_OOM_TEXT = re.compile(r"out of memory|CUBLAS_STATUS_ALLOC_FAILED|CUDNN_STATUS_ALLOC_FAILED|"
                       r"HIP error: out of memory|can't allocate memory", re.IGNORECASE)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is a device (or host) allocation failure, whatever class this torch uses for it."""
    if isinstance(exc, OUT_OF_MEMORY_ERRORS) or isinstance(exc, MemoryError):
        return True
    return isinstance(exc, RuntimeError) and bool(_OOM_TEXT.search(str(exc)))


def cuda_ready(device: str | torch.device | None = None) -> bool:
    """CUDA usable for ``device`` (a cuda device, or any when None) without raising."""
    if device is not None and torch.device(device).type != "cuda":
        return False
    try:
        return bool(torch.cuda.is_available())
    except Exception:  # a broken driver install can raise here
        return False


def _cuda_initialized() -> bool:
    is_init = getattr(torch.cuda, "is_initialized", None)
    return bool(is_init()) if is_init is not None else False


def cuda_index(device: str | torch.device) -> int:
    """The CUDA ordinal of ``device`` ("cuda" = the current device); keeps ``cuda:1`` as 1."""
    dev = torch.device(device)
    if dev.index is not None:
        return dev.index
    return torch.cuda.current_device() if cuda_ready() else 0


def with_index(device: str | torch.device) -> torch.device:
    """``cuda`` made explicit (``cuda:N``, the current device) so later calls cannot drift; others as given."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and cuda_ready():
        return torch.device("cuda", torch.cuda.current_device())
    return dev


def mem_get_info(device: str | torch.device) -> tuple[int, int] | None:
    """(free, total) bytes of a CUDA device as the driver sees them; None for other devices or no CUDA."""
    if not cuda_ready(device):
        return None
    try:
        return tuple(torch.cuda.mem_get_info(cuda_index(device)))  # type: ignore[return-value]
    except Exception:
        return None


def empty_cache(device: str | torch.device) -> None:
    """Give torch's cached, unused blocks of ``device`` back to the driver (for the WebUI to use).

    ``torch.cuda.empty_cache()`` works on the current device only, hence the
    device context.  A process that never touched CUDA has nothing cached.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        if not cuda_ready(dev) or not _cuda_initialized():
            return
        with torch.cuda.device(cuda_index(dev)):
            torch.cuda.empty_cache()
    elif dev.type == "mps":
        mps = getattr(torch, "mps", None)
        if mps is not None and hasattr(mps, "empty_cache"):
            try:
                mps.empty_cache()
            except Exception:
                pass


def synchronize(device: str | torch.device) -> None:
    """Wait for ``device``'s queued work (timings); nothing for the CPU."""
    dev = torch.device(device)
    if dev.type == "cuda" and cuda_ready(dev):
        torch.cuda.synchronize(cuda_index(dev))


def memory_allocated(device: str | torch.device) -> int:
    """Bytes torch holds in live tensors on a CUDA device (0 elsewhere)."""
    dev = torch.device(device)
    if dev.type != "cuda" or not cuda_ready(dev) or not _cuda_initialized():
        return 0
    return int(torch.cuda.memory_allocated(cuda_index(dev)))


def memory_reserved(device: str | torch.device) -> int:
    """Bytes torch's caching allocator holds from the driver on a CUDA device (0 elsewhere)."""
    dev = torch.device(device)
    if dev.type != "cuda" or not cuda_ready(dev) or not _cuda_initialized():
        return 0
    return int(torch.cuda.memory_reserved(cuda_index(dev)))


def register_load_state_dict_pre_hook(module: torch.nn.Module, hook: Callable[..., None]):
    """``module.register_load_state_dict_pre_hook(hook)`` on any torch; returns the removable handle.

    The public method is new in torch 2.5; 2.1-2.4 only have the private
    ``_register_load_state_dict_pre_hook``, which calls the hook without the
    module as first argument (write hooks as ``hook(*args, **kwargs)``).
    """
    public = getattr(module, "register_load_state_dict_pre_hook", None)
    if public is not None:
        return public(hook)
    return module._register_load_state_dict_pre_hook(hook)


def describe_torch() -> str:
    """torch's version and build, e.g. ``2.1.2+cu121 (CUDA 12.1)`` or ``2.3.1 (ROCm 6.0)``."""
    hip = getattr(torch.version, "hip", None)
    cuda = getattr(torch.version, "cuda", None)
    build = f"ROCm {hip}" if hip else f"CUDA {cuda}" if cuda else "CPU build"
    return f"{torch.__version__} ({build})"


__all__ = ["OUT_OF_MEMORY_ERRORS", "TORCH_VERSION", "is_out_of_memory", "cuda_ready", "cuda_index", "with_index",
           "mem_get_info", "empty_cache", "synchronize", "memory_allocated", "memory_reserved", "describe_torch",
           "register_load_state_dict_pre_hook"]
