"""Stable Diffusion 1.x (1.4, 1.5 and their fine-tunes)."""
from trainer.models.families import Calibration, Family

FAMILIES = [Family(
    key="sd1", name="SD 1.x", group="sd1", base_version="sd_v1", architecture="stable-diffusion-v1/lora",
    implementation="diffusers", prediction_type="epsilon", native_resolution=512, params=(860e6, 123e6, 84e6),
    blocks=(12, 1, 12), resolutions=(64, 1024),
    # from `python -m trainer memory` under CUDA's autocast casts (BENCHMARKS.md, 2026-12-03): without
    # checkpointing sd15_character's steps peak minus the weights, LoRA state and trained text encoder (1.39 per
    # 512 px image; 0.90 under the CPU's casts); with it the 512 px nf4 batch 1 row (0.25; was 0.17). Samples:
    # sd15_character 0.73 GB at 512 px (was 0.52); lean turns measured apart on SD 1.5 512 px nf4 (0.19 and 0.41 GB,
    # under the CPU's casts). Linear share counted from the config; the CPU prior from `python -m trainer bench`
    # on a 2-core x86 VM (fp32).
    calibration=Calibration(act_gb=(1.39, 0.26), sample_act_gb=0.75, sample_denoise_act_gb=0.2,
                            sample_decode_act_gb=0.4, linear_share=0.31, prior_step_s={"cpu": 25.0, "cuda": 0.25}),
    checkpoint_marker="cond_stage_model.transformer.",
    checkpoint_te={"te1": ("cond_stage_model.transformer.", "clip")},
    guessable=True,
)]
