"""LoRA adapters as merge inputs and outputs.

- :mod:`.formats` recognises a LoRA file by its keys and groups them into modules;
- :mod:`.keymap` maps LoRA module names (kohya, PEFT) to the base checkpoint's keys and back;
- :mod:`.delta` builds a module's weight delta from its factors, rows at a time;
- :mod:`.reader` presents a LoRA bound to a base as a checkpoint (base + delta per key);
- :mod:`.extract` writes any merge's delta as a kohya LoRA by truncated SVD.

Nothing is imported here: the engine imports :mod:`.reader`, and
:mod:`.extract` imports the engine, so an eager import would be circular.
"""
