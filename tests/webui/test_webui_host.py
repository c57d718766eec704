"""The extension in a real WebUI: HTTP route, hot-load, infotext, save, restore, queue lock, failure rollback.

Runs against A1111 (WEBUI_ROOT) and/or Forge (FORGE_ROOT); see conftest.py.
The tests share one server per host and run in file order (each builds on
the state the previous one left), so run them with ``-x``::

    WEBUI_ROOT=/path/to/a1111 HF_HOME=/path/to/hf_home .venv/bin/python -m pytest tests/webui -x -q
"""
from __future__ import annotations

import os
import re
import threading
import time

import pytest

pytestmark = pytest.mark.webui

# a cheap recipe on 2 cores (no hash masks); DARE-TIES itself is covered by the engine tests
RECIPE = {"base": "dm_base", "models": ["dm_ft1", "dm_ft2"], "method": "ties_soup", "alpha": 0.8}
STATE: dict = {}


def _params(infotext: str) -> dict[str, str]:
    last = infotext.strip().splitlines()[-1]
    return dict(re.findall(r"([A-Za-z][\w ]*?): ([^,]+)(?:, |$)", last))


def test_extension_loaded_with_auth_and_settings(webui):
    status, body = webui.request("GET", "/dare-merge/v1/status", auth=False)
    assert status == 401, (status, body)
    info = webui.ok("GET", "/dare-merge/v1/status")
    assert info["host"] == webui.kind
    assert info["busy"] is False and info["merges_performed"] == 0
    # the settings are registered with the WebUI and settable through its own API
    webui.ok("POST", "/sdapi/v1/options", {"dare_merge_precision": "bf16", "dare_merge_cache_mb": 1234})
    settings = webui.ok("GET", "/dare-merge/v1/status")["settings"]
    assert settings["precision"] == "bf16" and settings["cache_mb"] == 1234, settings
    webui.ok("POST", "/sdapi/v1/options", {"dare_merge_precision": "auto", "dare_merge_cache_mb": 4096})
    assert webui.ok("GET", "/dare-merge/v1/status")["settings"]["precision"] == "fp32"  # the model runs in fp32
    if webui.kind == "a1111":  # Forge's GET /options only shows options known when its API models were built
        options = webui.ok("GET", "/sdapi/v1/options")
        for key in ("dare_merge_device", "dare_merge_precision", "dare_merge_cache_mb"):
            assert key in options, f"setting {key} missing from /sdapi/v1/options"


def test_bad_requests_are_refused_with_a_message(webui):
    status, body = webui.request("POST", "/dare-merge/v1/merge", dict(RECIPE, p=1.5, method="dare_ties"))
    assert status == 400 and "p (DARE drop rate) = 1.5" in body["error"], body
    status, body = webui.request("POST", "/dare-merge/v1/merge", dict(RECIPE, models=["no_such_model"]))
    assert status == 400 and "no_such_model" in body["error"], body
    status, body = webui.request("POST", "/dare-merge/v1/merge",
                                 dict(RECIPE, save=True, save_name="../escape", hot_load=False))
    assert status == 400 and body["type"] == "OutputError", body
    assert webui.ok("GET", "/dare-merge/v1/status")["merges_performed"] == 0


def test_hot_load_changes_weights_image_and_infotext(webui):
    pixels, infotext = webui.txt2img()
    params = _params(infotext)
    STATE.update(before_pixels=pixels, original_model=params["Model"], original_hash=params["Model hash"],
                 before_fp=webui.fingerprint())
    assert params["Model"] == "dm_base"

    answer = webui.ok("POST", "/dare-merge/v1/merge", RECIPE)
    assert answer["hot_loaded"] and not answer["reused"] and answer["saved"] is None
    name, recipe_hash = answer["name"], answer["recipe_hash"]
    assert re.fullmatch(r"[0-9a-f]{10}", recipe_hash) and recipe_hash in name
    STATE.update(name=name, recipe_hash=recipe_hash)
    status = webui.ok("GET", "/dare-merge/v1/status")
    assert status["loaded_recipe_hash"] == recipe_hash and status["hot_loaded"]
    assert status["original"] and status["original"].startswith("dm_base")

    pixels, infotext = webui.txt2img()
    params = _params(infotext)
    assert params["Model"] == name, infotext
    assert params["Model hash"] == recipe_hash, infotext
    assert pixels != STATE["before_pixels"], "the image did not change after the hot-load"
    STATE["merged_pixels"] = pixels
    STATE["merged_fp"] = webui.fingerprint()
    assert STATE["merged_fp"] != STATE["before_fp"]


def test_merge_survives_checkpoint_refresh(webui):
    webui.ok("POST", "/sdapi/v1/refresh-checkpoints")
    titles = [m["title"] for m in webui.ok("GET", "/sdapi/v1/sd-models")]
    assert f"{STATE['name']} [{STATE['recipe_hash']}]" in titles, titles
    pixels, infotext = webui.txt2img()
    assert _params(infotext)["Model hash"] == STATE["recipe_hash"], infotext
    assert pixels == STATE["merged_pixels"], "same merge, same seed: the image must be the same"


def test_save_writes_the_in_memory_merge_without_merging_again(webui):
    answer = webui.ok("POST", "/dare-merge/v1/merge",
                      dict(RECIPE, save=True, save_name="dm-merged", save_dtype="fp16"))
    assert answer["reused"] is True, answer
    assert os.path.isfile(answer["saved"]) and answer["saved"].endswith("dm-merged.safetensors")
    assert webui.ok("GET", "/dare-merge/v1/status")["merges_performed"] == 1
    titles = [m["title"] for m in webui.ok("GET", "/sdapi/v1/sd-models")]
    assert any(t.startswith("dm-merged.safetensors") for t in titles), titles
    status, body = webui.request("POST", "/dare-merge/v1/merge",
                                 dict(RECIPE, save=True, save_name="dm-merged", hot_load=False))
    assert status == 400 and "exists" in body["error"], body
    from lib_merge.checkpoint import open_checkpoint
    from lib_merge.recipe import recipe_from_metadata
    with open_checkpoint(answer["saved"]) as ckpt:
        stored = recipe_from_metadata(ckpt.metadata)
    assert stored.resolved().params_dict() == answer["recipe"]


def test_restore_puts_the_original_back(webui):
    answer = webui.ok("POST", "/dare-merge/v1/restore")
    assert answer["restored"].startswith(STATE["original_model"]), answer
    pixels, infotext = webui.txt2img()
    params = _params(infotext)
    assert params["Model"] == STATE["original_model"] and params["Model hash"] == STATE["original_hash"], infotext
    assert pixels == STATE["before_pixels"], "restored model, same seed: the image must be the original one"
    assert webui.fingerprint() == STATE["before_fp"]
    titles = [m["title"] for m in webui.ok("GET", "/sdapi/v1/sd-models")]
    assert not any(t.startswith(STATE["name"]) for t in titles), "the merge is still listed after restore"


def test_failed_hot_load_restores_the_previous_weights(webui):
    # previous = the original checkpoint (read back from its file)
    webui.ok("POST", "/dare-merge/v1/test/fail-next-hot-load", {"after": 200})
    status, body = webui.request("POST", "/dare-merge/v1/merge", RECIPE)
    assert status == 400 and "put back" in body["error"] and "injected failure" in body["error"], body
    assert webui.fingerprint() == STATE["before_fp"]
    assert webui.ok("GET", "/dare-merge/v1/status")["loaded_recipe_hash"] is None
    # the merge kept in memory loads fine afterwards, without merging again
    answer = webui.ok("POST", "/dare-merge/v1/merge", RECIPE)
    assert answer["reused"] and answer["loaded_model"].startswith(STATE["name"])
    assert webui.fingerprint() == STATE["merged_fp"]
    # previous = a merge held in memory (written back from its state dict)
    webui.ok("POST", "/dare-merge/v1/test/fail-next-hot-load", {"after": 50})
    status, body = webui.request("POST", "/dare-merge/v1/merge", dict(RECIPE, method="weighted_sum", alpha=0.5))
    assert status == 400 and "put back" in body["error"], body
    assert webui.fingerprint() == STATE["merged_fp"]
    _, infotext = webui.txt2img()
    assert _params(infotext)["Model hash"] == STATE["recipe_hash"], infotext


def test_merge_waits_for_a_running_generation(webui):
    webui.ok("POST", "/dare-merge/v1/restore")
    done: dict = {}

    def generate():
        done["started"] = time.time()
        done["result"] = webui.txt2img(seed=3, steps=4)
        done["finished"] = time.time()

    thread = threading.Thread(target=generate)
    thread.start()
    time.sleep(3.0)
    assert thread.is_alive(), "the generation finished before the merge was requested; nothing was tested"
    answer = webui.ok("POST", "/dare-merge/v1/merge", RECIPE)
    thread.join()
    assert answer["requested_at"] < done["finished"]
    assert answer["waited_s"] > 1.0, answer
    assert answer["started_at"] >= answer["requested_at"] + answer["waited_s"] - 0.01
    assert _params(done["result"][1])["Model"] == STATE["original_model"], "the generation saw the merge"


def test_two_requests_are_serialised(webui):
    webui.ok("POST", "/dare-merge/v1/restore")
    answers: dict = {}

    def call(key, body):
        answers[key] = webui.ok("POST", "/dare-merge/v1/merge", body)

    threads = [threading.Thread(target=call, args=("hot", RECIPE)),
               threading.Thread(target=call, args=("save", dict(RECIPE, hot_load=False, save=True,
                                                                save_name="dm-merged-2")))]
    for t in threads:
        t.start()
        time.sleep(0.2)
    for t in threads:
        t.join()
    first, second = sorted(answers.values(), key=lambda a: a["started_at"])
    assert first["finished_at"] <= second["started_at"], (first, second)
    assert second["waited_s"] > 0
    assert webui.ok("GET", "/dare-merge/v1/status")["loaded_recipe_hash"] == STATE["recipe_hash"]


def test_lora_backups_cannot_undo_a_hot_load(webui):
    """A LoRA applied before the hot-load keeps a copy of the old weights; the next generation
    without it must not write that copy back over the merge (A1111 network backups, Forge LoraLoader)."""
    webui.ok("POST", "/dare-merge/v1/restore")
    lora_prompt = "a photo of a cat <lora:dm_lora:1>"
    with_lora, infotext = webui.txt2img(prompt=lora_prompt)
    assert "dm_lora" in infotext, infotext
    assert with_lora != STATE["before_pixels"], "the LoRA changed nothing; the test would prove nothing"
    answer = webui.ok("POST", "/dare-merge/v1/merge", RECIPE)
    assert answer["reused"], answer
    pixels, infotext = webui.txt2img()
    assert _params(infotext)["Model hash"] == STATE["recipe_hash"], infotext
    assert pixels == STATE["merged_pixels"], "the merge was undone by the LoRA's weight backup"
    assert webui.fingerprint() == STATE["merged_fp"]
    merged_lora, _ = webui.txt2img(prompt=lora_prompt)
    assert merged_lora not in (with_lora, STATE["merged_pixels"]), "the LoRA did not apply on top of the merge"
    pixels, _ = webui.txt2img()
    assert pixels == STATE["merged_pixels"]


def test_the_webuis_interrupt_cancels_a_merge(webui):
    """Interrupt (the WebUI's own button / API) stops a running merge; the loaded model is untouched."""
    loaded = webui.ok("GET", "/dare-merge/v1/status")["loaded_recipe_hash"]
    answer: dict = {}

    def merge():
        answer["reply"] = webui.request("POST", "/dare-merge/v1/merge", dict(RECIPE, method="weighted_sum",
                                                                              alpha=0.3))

    thread = threading.Thread(target=merge)
    thread.start()
    deadline = time.time() + 600
    while time.time() < deadline:
        progress = webui.ok("GET", "/sdapi/v1/progress?skip_current_image=true")
        if (progress.get("textinfo") or "").startswith("DARE merge:"):
            break
        time.sleep(0.3)
    else:
        pytest.fail("the merge never showed in the WebUI's progress")
    assert progress["state"]["job"] == "DARE merge (API)", progress
    assert progress["state"]["sampling_steps"] > 1000 and progress["state"]["sampling_step"] >= 1, progress
    webui.ok("POST", "/sdapi/v1/interrupt")
    thread.join(600)
    status, body = answer["reply"]
    assert status == 409 and body["type"] == "MergeCancelled", body
    after = webui.ok("GET", "/dare-merge/v1/status")
    assert after["loaded_recipe_hash"] == loaded and not after["busy"]
    assert webui.fingerprint() == STATE["merged_fp"]


def test_text_encoder_only_merge_is_not_hidden_by_the_prompt_cache(webui):
    """A merge that changes only the text encoder must change the image: cached conds are dropped."""
    webui.ok("POST", "/dare-merge/v1/restore")
    pixels, _ = webui.txt2img()           # conds for this prompt are now cached
    assert pixels == STATE["before_pixels"]
    answer = webui.ok("POST", "/dare-merge/v1/merge", dict(RECIPE, method="weighted_sum", alpha=0.5,
                                                          alpha_unet=0.0))
    assert not answer["reused"]
    pixels, infotext = webui.txt2img()
    assert _params(infotext)["Model hash"] == answer["recipe_hash"], infotext
    assert pixels != STATE["before_pixels"], "same image after a text-encoder merge: stale conds were used"
