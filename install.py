"""Run by the WebUI at start-up (``launch_utils.run_extension_installer``); returns at once.

lib_merge needs torch, numpy and safetensors, which every A1111/Forge venv
already has, and gradio, which is the WebUI's own.  Nothing is installed
unless one of them is somehow missing.
"""
import launch

for package in ("safetensors", "numpy"):
    if not launch.is_installed(package):
        launch.run_pip(f"install {package}", f"{package} for sd-webui-dare-merge")
