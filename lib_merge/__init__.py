"""Strict DARE/TIES merging of Stable Diffusion checkpoints (pure torch + safetensors).

Importable without a WebUI or gradio.  Start at :class:`MergeRecipe`, then
:func:`merge_to_file` or :func:`merge_to_memory`; the maths is in
:mod:`lib_merge.kernels`.
"""
from .api import build_metadata, input_hashes, merge_to_file, merge_to_memory
from .engine import CancelToken, MergePlan, MergeReport, Progress, default_device, iter_merge
from .errors import (ArchitectureError, CheckpointError, MergeCancelled, MergeError, NonFiniteError,
                     OutputError, ParameterError, ShapeMismatchError)
from .methods import METHODS, get_method
from .recipe import MergeRecipe, recipe_from_metadata

__version__ = "0.1.0"

__all__ = ["MergeRecipe", "merge_to_file", "merge_to_memory", "iter_merge", "MergePlan", "MergeReport",
           "Progress", "CancelToken", "default_device", "METHODS", "get_method", "recipe_from_metadata",
           "build_metadata", "input_hashes", "MergeError", "CheckpointError", "ArchitectureError",
           "ShapeMismatchError", "ParameterError", "OutputError", "NonFiniteError", "MergeCancelled"]
