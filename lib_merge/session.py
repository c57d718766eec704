"""One user's merge state: the current recipe, its in-memory result, save and restore.

The tab (standalone or in a WebUI), the HTTP route and the XYZ script all act
on one ``MergeSession``: merging keeps the result in RAM so that "Save"
writes it without merging again, a lock serialises merges, and a
:class:`HotLoader` (supplied by the WebUI adapter; absent standalone) puts the
result into the running model and can put the original back.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from .api import build_metadata, input_hashes
from .checkpoint import Checkpoint, open_checkpoint
from .compat import OUT_OF_MEMORY_ERRORS, empty_cache, is_out_of_memory
from .devices import resolve_merge_device
from .engine import CancelToken, MergePlan, MergeReport, Progress, default_device, iter_merge
from .errors import MergeError, OutputError
from .recipe import MergeRecipe
from .writer import OUTPUT_TORCH_DTYPES, SafetensorsWriter, check_output_name, check_output_target


class HotLoader(Protocol):
    """What a host (A1111, Forge) provides to swap weights in the running model."""

    def load(self, state: dict[str, torch.Tensor], name: str, recipe_hash: str, recipe: MergeRecipe) -> None:
        """Put merged weights into the running model; on failure restore what was loaded and raise."""

    def restore(self) -> str:
        """Put back the checkpoint that was loaded before the first merge; returns its name."""


@dataclass
class MergeResult:
    recipe: MergeRecipe
    state: dict[str, torch.Tensor]
    dtype: str
    report: MergeReport
    recipe_hash: str
    inputs: dict[str, dict]
    merged_at: float = field(default_factory=time.time)

    @property
    def name(self) -> str:
        """Display name of the merge (infotext, checkpoint list): method + recipe hash."""
        return f"dare-merge-{self.recipe.resolved().method}-{self.recipe_hash}"


class MergeSession:
    """Serialised merges with an in-memory result, for UIs and the HTTP route."""

    def __init__(self, models_dir: str, hot_loader: HotLoader | None = None,
                 device: str | None = None, refresh_models: Callable[[], None] | None = None,
                 opener: Callable[[str], Checkpoint] = open_checkpoint) -> None:
        self.models_dir = models_dir
        self.hot_loader = hot_loader
        self.device = device or default_device()
        self.refresh_models = refresh_models
        self.opener = opener  # how inputs are opened: from disk, or from the XYZ input cache
        self.lock = threading.Lock()
        self.result: MergeResult | None = None
        self.cancel_token: CancelToken | None = None
        self.merges_performed = 0
        self.last_message = "idle"
        self.hot_loaded = False
        # called when a device merge runs out of memory, before the CPU retry (the XYZ input cache's
        # out_of_memory: its GPU tier is given back); see session_reads_from
        self.out_of_memory_hooks: list[Callable[[], object]] = []
        # files a save must never replace besides the merge's own inputs: a WebUI names the checkpoint
        # it has loaded now (and the one "Restore original" goes back to)
        self.protected_files: Callable[[], list[str]] = lambda: []

    # -- merge
    def merge(self, recipe: MergeRecipe, dtype: str = "fp16", device: str | None = None,
              hot_load: bool = True, progress: Callable[[Progress], None] | None = None,
              inputs: dict[str, dict] | None = None, stats: bool = False) -> MergeResult:
        """Merge into memory (and hot-load when a loader is present); one merge at a time.

        The device is resolved by :func:`~lib_merge.devices.resolve_merge_device`
        (``mps``/``xpu`` merge on the CPU, with a note in the report).  A GPU
        merge that runs out of memory is retried on the CPU after the
        :attr:`out_of_memory_hooks` and ``empty_cache()`` gave the memory back;
        the report says so in one line with advice.  Nothing is hot-loaded
        before the merge has succeeded, so a failure leaves the model as it was.
        ``stats``: gather the merge's statistics (share, kept, agreement) in the same pass, as
        ``result.report.stats`` (what the tab's Analysis panel and the HTTP answer show).
        """
        with self.lock:
            self.cancel_token = CancelToken()
            started = time.perf_counter()
            target = resolve_merge_device(device or self.device)
            try:
                plan, state = self._merge_with_fallback(recipe, dtype, target.device, progress, stats)
            finally:
                self.cancel_token = None
            if target.note:
                plan.report.notes.append(target.note)
            inputs = inputs if inputs is not None else input_hashes(plan.recipe)
            result = MergeResult(plan.recipe, state, dtype, plan.report, plan.recipe.recipe_hash(inputs), inputs)
            self.merges_performed += 1
            if hot_load and self.hot_loader is not None:
                self.hot_loader.load(state, result.name, result.recipe_hash, plan.recipe)
                self.hot_loaded = True
            self.result = result
            plan.report.seconds = time.perf_counter() - started
            self.last_message = plan.report.summary()
            return result

    def _merge_once(self, recipe: MergeRecipe, dtype: str, device: str,
                    progress: Callable[[Progress], None] | None, stats: bool = False
                    ) -> tuple[MergePlan, dict[str, torch.Tensor]]:
        plan = MergePlan(recipe, dtype, opener=self.opener, stats=stats)
        try:
            return plan, dict(iter_merge(plan, device, progress, self.cancel_token, own_memory=True))
        finally:
            plan.close()

    def _merge_with_fallback(self, recipe: MergeRecipe, dtype: str, device: str,
                             progress: Callable[[Progress], None] | None, stats: bool = False
                             ) -> tuple[MergePlan, dict[str, torch.Tensor]]:
        failure = None
        try:
            return self._merge_once(recipe, dtype, device, progress, stats)
        except (*OUT_OF_MEMORY_ERRORS, RuntimeError) as exc:
            if torch.device(device).type == "cpu" or not is_out_of_memory(exc):
                raise
            failure = str(exc).splitlines()[0][:160]
        # outside the except block: the traceback (and the device buffers its frames hold) is gone
        for hook in list(self.out_of_memory_hooks):
            hook()
        empty_cache(device)
        plan, state = self._merge_once(recipe, dtype, "cpu", progress, stats)
        plan.report.notes.append(
            f"out of memory on {device} ({failure}); merged on the CPU instead: the result is the same. To merge "
            "on the GPU, free VRAM (--medvram/--lowvram), lower the X/Y/Z GPU cache budget, or choose the cpu "
            "merge device to skip this attempt")
        return plan, state

    def cancel(self) -> bool:
        token = self.cancel_token
        if token is None:
            return False
        token.cancel()
        return True

    # -- save
    def save(self, name: str, dtype: str = "fp16", overwrite: bool = False,
             recipe: MergeRecipe | None = None) -> str:
        """Write the current result (merging only if it is missing or not ``recipe``)."""
        filename = check_output_name(name)
        path = os.path.join(self.models_dir, filename)
        if os.path.exists(path) and not overwrite:
            raise OutputError("exists already; tick 'overwrite' or choose another name", path)
        with self.lock:
            result = self.result
        stale = result is None or (recipe is not None and recipe.resolved() != result.recipe)
        source = recipe if stale else result.recipe
        if source is None:
            raise MergeError("nothing merged yet: merge first, then save")
        loaded = self.protected_files()
        protected = [source.base, *source.models, *loaded]
        # before a merge is spent on a name that cannot be used
        check_output_target(path, [source.base, *source.models], "an input of this merge")
        check_output_target(path, loaded, "the checkpoint loaded now (or the one 'Restore original' loads)")
        if stale:
            result = self.merge(recipe, dtype=dtype, hot_load=False)
        with self.lock:
            _write_state(path, result, dtype, overwrite, protected)
        if self.refresh_models is not None:
            self.refresh_models()
        self.last_message = f"saved {path}"
        return path

    def restore(self) -> str:
        if self.hot_loader is None:
            raise MergeError("nothing to restore: no model is hot-loaded outside a WebUI")
        with self.lock:
            name = self.hot_loader.restore()
            self.hot_loaded = False
            self.last_message = f"restored {name}"
            return name

    def status(self) -> dict:
        r = self.result
        return {"busy": self.lock.locked(), "merges_performed": self.merges_performed,
                "message": self.last_message, "hot_loaded": self.hot_loaded,
                "current": None if r is None else {"name": r.name, "recipe_hash": r.recipe_hash,
                                                    "recipe": r.recipe.params_dict(),
                                                    "base": os.path.basename(r.recipe.base),
                                                    "models": [os.path.basename(m) for m in r.recipe.models]}}


def _write_state(path: str, result: MergeResult, dtype: str, overwrite: bool, protected: list[str]) -> None:
    torch_dtype = OUTPUT_TORCH_DTYPES[dtype]

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(torch_dtype) if t.is_floating_point() and t.dtype != torch_dtype and t.dtype in (
            torch.float16, torch.bfloat16, torch.float32) and _merged_dtype(result, t) else t

    entries = [(k, tuple(t.shape), cast(t).dtype) for k, t in result.state.items()]
    with SafetensorsWriter(path, entries, overwrite=overwrite, protected_paths=protected) as writer:
        for key, tensor in result.state.items():
            writer.write(key, cast(tensor))
        writer.commit(build_metadata(result.recipe, result.inputs, dtype))


def _merged_dtype(result: MergeResult, tensor: torch.Tensor) -> bool:
    # Keys the merge produced in its output dtype follow the save dtype; others keep theirs.
    return tensor.dtype == OUTPUT_TORCH_DTYPES[result.dtype]
