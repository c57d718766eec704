"""sd-webui-dare-merge: the WebUI entry point (AUTOMATIC1111 1.10 and Forge 2).

The WebUI executes every file in scripts/; this one only wires callbacks to
``lib_merge.webui``, where the tab's host, the hot-load, the HTTP routes and
the settings live.  The extension folder is on ``sys.path`` while this file
runs, which is when ``lib_merge`` is imported (later imports find it in
``sys.modules``).
"""
from modules import script_callbacks

import lib_merge.webui as dare_merge

dare_merge.setup()
script_callbacks.on_ui_tabs(dare_merge.on_ui_tabs)
script_callbacks.on_ui_settings(dare_merge.on_ui_settings)
script_callbacks.on_app_started(dare_merge.on_app_started)
script_callbacks.on_script_unloaded(dare_merge.on_script_unloaded)
