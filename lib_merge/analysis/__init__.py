"""See inside a merge: task-vector norms, similarity, sign conflicts and each model's share per block.

``analyze(base, models, recipe=None, ...)`` answers the analysis JSON
(/tmp/coord/analysis-schema.md; the names are in the README's "Analysis"
section); ``stats.MergeStats`` is what a merge gathers while it runs
(``MergeReport.stats``); ``plots`` draws the JSON.  Imported lazily: the engine
imports ``analysis.stats``, and ``analyze`` imports the engine.
"""
from __future__ import annotations

__all__ = ["analyze", "write_analysis"]


def __getattr__(name: str):
    if name in __all__:
        from . import inputs
        return getattr(inputs, name)
    raise AttributeError(name)
