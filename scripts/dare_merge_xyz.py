"""sd-webui-dare-merge: merge knobs on the built-in X/Y/Z plot, and the "DARE Merge" section of txt2img/img2img.

The WebUI executes every file in scripts/; this one holds only the section's
``scripts.Script`` subclass (the WebUI finds it by scanning this file) and
wires callbacks to :mod:`lib_merge.webui.xyz`, where the axes, the recipe for
a cell, the input cache, the after-grid restore, the infotext paste and the
HTTP route live.  The axes are registered both now and from
``on_before_ui`` (see that module's doc for why).
"""
from modules import script_callbacks, scripts

from lib_merge.webui import xyz
from lib_merge.webui.xyz_section import build_section


class DareMergeSection(scripts.Script):
    """The "DARE Merge" section under txt2img/img2img (see lib_merge.webui.xyz)."""

    dare_merge_section = True   # lib_merge.webui.xyz.section_args_of finds the section's args by this

    def title(self):
        return "DARE Merge"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        return build_section(self, is_img2img)

    def before_process(self, p, *args):
        xyz.before_process(p, args)


xyz.register_axes()
script_callbacks.on_before_ui(xyz.on_before_ui)
script_callbacks.on_infotext_pasted(xyz.on_infotext_pasted)
script_callbacks.on_ui_settings(xyz.on_ui_settings)
script_callbacks.on_app_started(xyz.on_app_started)
script_callbacks.on_script_unloaded(xyz.on_script_unloaded)
