// Hover titles for the DARE Merge tab.
// A1111/Forge convention (javascript/hints.js): a titles map applied from onUiUpdate.  The WebUI's own
// `titles` map is keyed by label text, which would clash with its "Seed" or "Save"; this one is keyed by
// elem_id.  The map is JSON between the BEGIN/END markers: lib_merge/ui/hints.py reads it so the
// standalone server injects the same titles and the tests can check every control has one.
const dareMergeTitles = /* BEGIN TITLES */ {
    "dare_merge_base": "Base checkpoint (theta0): the deltas of the other models are taken against it",
    "dare_merge_base_refresh": "Re-scan the checkpoint folder",
    "dare_merge_models": "Models merged into the base (one or more); their differences from the base are combined",
    "dare_merge_models_refresh": "Re-scan the checkpoint folder",
    "dare_merge_weights": "Optional weight per model, comma-separated in the order picked (empty = all 1)",
    "dare_merge_method": "Merge method preset: sets the sliders below to the values it is known for",
    "dare_merge_method_help": "What the chosen method does",
    "dare_merge_p": "DARE drop rate: fraction of each delta randomly zeroed (0 = no DARE)",
    "dare_merge_k": "TIES keep fraction: keep only the top-k largest delta magnitudes (1 = keep all)",
    "dare_merge_alpha": "Strength: how far the result moves from the base towards the merged delta",
    "dare_merge_lambda": "DARE rescale strength: kept deltas are multiplied by (1-p)^-lambda",
    "dare_merge_vote_sgn": "Elect each element's sign by counting signs instead of summing magnitudes (TIES-SOUP)",
    "dare_merge_epsilon": "DELLA: keep probability runs from 1-p-eps (smallest |delta|) to 1-p+eps (largest)",
    "dare_merge_beta": "Breadcrumbs: fraction of the largest |delta| per tensor dropped as outliers",
    "dare_merge_rescale": "uniform: (1-p)^-lambda; unbiased: 1/(1-p^j) where j models agree (TIES mean)",
    "dare_merge_seed": "Seed of the DARE drop masks: same seed, same result",
    "dare_merge_seed_random": "Pick a random seed",
    "dare_merge_advanced": "Per-component alpha, block weights, VAE, device, precision and the self-test",
    "dare_merge_split_alpha": "Use separate alpha values for the UNet and the text encoder",
    "dare_merge_alpha_unet": "Alpha for UNet weights (when per-component alpha is on)",
    "dare_merge_alpha_te": "Alpha for text-encoder weights (when per-component alpha is on)",
    "dare_merge_block_preset": "Fill the block weights with a named shape for the base's architecture",
    "dare_merge_block_weights": "Alpha multiplier per block: 26 values for SD1/SD2, 20 for SDXL (BASE,IN00..,M00,OUT..); empty = off",
    "dare_merge_block_p": "DARE drop rate per block, same notation; replaces p in each block; empty = use p",
    "dare_merge_block_k": "TIES keep fraction per block, same notation; replaces k in each block; empty = use k",
    "dare_merge_merge_mode": "How agreeing deltas combine: mean (TIES) or sum (task arithmetic); default = the method's",
    "dare_merge_vae": "VAE of the result: copied from the base, or merged like the other weights",
    "dare_merge_skip_mismatched": "Skip keys whose shapes differ between models instead of stopping with an error",
    "dare_merge_device": "Device that computes the merge (cuda is much faster when available)",
    "dare_merge_precision": "Precision of the merged weights kept in memory (and used when hot-loading)",
    "dare_merge_selftest_arch": "Key shapes the self-test merges with: SD1 (quicker) or SDXL",
    "dare_merge_selftest_run": "Check the merge on this torch and the device above (a few minutes); generation waits",
    "dare_merge_selftest_report": "The self-test's report: paste it into a bug report",
    "dare_merge_hot_load": "Load the merged weights into the running model right after merging (no file written)",
    "dare_merge_run": "Merge now with these settings (keeps the result in memory)",
    "dare_merge_cancel": "Stop the running merge; nothing is written",
    "dare_merge_restore": "Put back the checkpoint that was loaded before the first merge",
    "dare_merge_status": "What happened: progress, result summary or the error",
    "dare_merge_save_name": "File name for the merged checkpoint (.safetensors is added; no folders)",
    "dare_merge_save_dtype": "Precision of the saved file: fp16 (default, half the size), bf16 or fp32",
    "dare_merge_save_overwrite": "Allow replacing a file of the same name",
    "dare_merge_save": "Write the current merge to the checkpoint folder (merges first if the settings changed)",
    "dare_merge_lora_rank": "Rank of each layer Save as LoRA writes: higher keeps more of the merge, in a larger file",
    "dare_merge_save_lora": "Write the merge minus the base as a LoRA (LoCon for convs) into the Lora folder, named as Save as",
    "dare_merge_inspect": "Look inside a checkpoint: architecture, components, dtypes, stored recipe",
    "dare_merge_inspect_file": "Checkpoint to inspect",
    "dare_merge_inspect_refresh": "Re-scan the checkpoint folder",
    "dare_merge_inspect_button": "Show the architecture, components, dtypes and stored merge recipe",
    "dare_merge_inspect_output": "Summary of the inspected checkpoint",
    "dare_merge_analysis": "Plots of what each model changes, where they disagree, and what the merge keeps of each",
    "dare_merge_analyse": "Analyse the base, models and knobs picked above (about as long as a merge); generation waits",
    "dare_merge_analysis_cancel": "Stop the running analysis",
    "dare_merge_analysis_summary": "The analysis in a few lines: biggest change, most alike models, worst conflict, shares",
    "dare_merge_analysis_json": "The analysis numbers as JSON (the same file python -m lib_merge analyze writes)",
    "dare_merge_analysis_norms": "Brighter = the model changed that block more; dark blocks barely change, so weights there do little",
    "dare_merge_analysis_cosine": "1 = two models changed weights the same way, 0 = unrelated, -1 = opposite",
    "dare_merge_analysis_conflict": "Share of changed weights where the models push opposite ways; TIES' sign vote decides there",
    "dare_merge_analysis_share": "How the merged change of each block splits between the models",
    "dare_merge_analysis_kept": "Fraction of each model's changed weights left after the random drop (p) and the trim (k)"
} /* END TITLES */;

function dareMergeApplyTitles() {
    const root = typeof gradioApp === "function" ? gradioApp() : document;
    for (const [id, text] of Object.entries(dareMergeTitles)) {
        const el = root.querySelector("#" + id);
        if (el && el.title !== text) {
            el.title = text;
        }
    }
}

if (typeof onUiUpdate === "function") {
    onUiUpdate(dareMergeApplyTitles);
}
