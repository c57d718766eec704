"""What the merge tab needs from whoever serves it (standalone server or a WebUI).

The tab itself is the same everywhere; a host says where checkpoints come
from, which device to use, whether merged weights can be hot-loaded into a
running model, and how GPU work is serialised (a WebUI's queue lock, or
nothing standalone).  :class:`TabHost` is the protocol with sensible
defaults; :class:`FolderHost` is the standalone host over one folder.
"""
from __future__ import annotations

import os
from typing import Callable, Protocol, TypeVar, runtime_checkable

from ..engine import Progress, default_device
from ..session import MergeSession

T = TypeVar("T")

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")


@runtime_checkable
class TabHost(Protocol):
    """The tab's view of its host; subclass it to inherit the defaults below.

    Attributes:
        session: the one :class:`MergeSession` the tab (and any HTTP route) acts on.
        can_hot_load: show "hot-load" and "Restore original" (a WebUI with a loader).
        show_inspect: show the "Inspect a checkpoint" section.
    """

    session: MergeSession
    can_hot_load: bool
    show_inspect: bool

    def list_checkpoints(self) -> list[str]:
        """Titles of the checkpoints the user can pick, in display order."""
        ...

    def resolve(self, title: str) -> str:
        """Path of the checkpoint shown as ``title``."""
        ...

    def refresh(self) -> None:
        """Re-scan the checkpoint folder (after a save, or on a refresh click)."""
        ...

    def default_device(self) -> str:
        """Device the device dropdown starts at ("cpu" or "cuda")."""
        return default_device()

    def lora_folder(self) -> str:
        """Where "Save as LoRA" writes: the checkpoint folder standalone, a WebUI's Lora folder inside one."""
        return self.session.models_dir

    def default_precision(self) -> str:
        """Working precision the tab starts at (fp16, bf16, fp32)."""
        return "fp16"

    def run_exclusive(self, fn: Callable[[], T]) -> T:
        """Run GPU-heavy work; a WebUI runs it under its queue lock so it never overlaps generation."""
        return fn()

    def on_progress(self, event: Progress) -> None:
        """Mirror merge progress elsewhere (a WebUI's progress bar); the tab shows its own."""
        return None


class FolderHost(TabHost):
    """Standalone host: the checkpoints are the *.safetensors / *.ckpt files under one folder."""

    can_hot_load = False
    show_inspect = True

    def __init__(self, models_dir: str, device: str | None = None) -> None:
        self.models_dir = os.path.abspath(models_dir)
        self.session = MergeSession(self.models_dir, hot_loader=None, device=device)
        self._device = device
        self._titles: list[str] = []
        self.refresh()

    def refresh(self) -> None:
        """Checkpoints first, then the LoRAs of the folder marked "LoRA: " (recognised by content)."""
        from ..lora.listing import is_lora_file, lora_title
        titles, loras = [], []
        for root, dirs, files in os.walk(self.models_dir):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in files:
                if name.lower().endswith(CHECKPOINT_SUFFIXES) and not name.startswith("."):
                    path = os.path.join(root, name)
                    if name.lower().endswith(".safetensors") and is_lora_file(path):
                        loras.append(lora_title(self.models_dir, path))
                    else:
                        titles.append(os.path.relpath(path, self.models_dir).replace(os.sep, "/"))
        self._titles = sorted(titles, key=str.lower) + sorted(loras, key=str.lower)

    def list_checkpoints(self) -> list[str]:
        return list(self._titles)

    def resolve(self, title: str) -> str:
        from ..lora.listing import LORA_MARK
        if title.startswith(LORA_MARK):
            title = title[len(LORA_MARK):]
        path = os.path.normpath(os.path.join(self.models_dir, title))
        if os.path.commonpath([path, self.models_dir]) != self.models_dir:
            from ..errors import CheckpointError
            raise CheckpointError("is outside the models folder", title)
        return path

    def default_device(self) -> str:
        return self._device or default_device()
