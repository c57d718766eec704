"""The merge tab (gradio), shared by the standalone server and the WebUI extension.

Importing this package does not import gradio; :mod:`lib_merge.ui.tab` and
:mod:`lib_merge.ui.standalone` do, so ``lib_merge`` stays usable without it.
"""
from .host import FolderHost, TabHost

__all__ = ["TabHost", "FolderHost"]
