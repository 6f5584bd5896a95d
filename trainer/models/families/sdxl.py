"""Stable Diffusion XL 1.0 (base and its fine-tunes): two text encoders, SGM key names in kohya files. Its
v-prediction variant (NoobAI-XL V-Pred and its merges) differs only in the training target."""
import dataclasses

from trainer.models.families import Calibration, Family

SDXL = Family(
    key="sdxl", name="SDXL", group="sdxl", base_version="sdxl_base_v1-0", architecture="stable-diffusion-xl-v1-base/lora",
    implementation="https://github.com/Stability-AI/generative-models", prediction_type="epsilon",
    native_resolution=1024, params=(2567e6, 123e6 + 695e6, 84e6), blocks=(9, 1, 9), resolutions=(64, 2048),
    # from `python -m trainer memory` under CUDA's autocast casts (BENCHMARKS.md, 2026-12-03): with checkpointing
    # the larger of sdxl_4gb and sdxl_6gb (0.58 and 0.66 GB at 1024 px, batch 1; 0.44 and 0.54 under the CPU's
    # casts); without it the 768 px batch 1 rank 8 row (9.4 GB per 1024 px image; was 6.4). Samples: sdxl_4gb
    # 0.45 GB; lean turns on sdxl_6gb (0.43 and 0.44 GB), both under the CPU's casts. Linear share from the config.
    calibration=Calibration(act_gb=(9.4, 0.66), sample_act_gb=0.45, sample_denoise_act_gb=0.45,
                            sample_decode_act_gb=0.45, linear_share=0.87, prior_step_s={"cpu": 160.0, "cuda": 1.0}),
    te_prefixes={"te1": "lora_te1_", "te2": "lora_te2_"}, unet_key_style="sgm",
    checkpoint_marker="conditioner.embedders.1.",
    checkpoint_te={"te1": ("conditioner.embedders.0.transformer.", "clip"),
                   "te2": ("conditioner.embedders.1.model.", "openclip")},
    tokenizer_pads=(None, "!"), pipeline="StableDiffusionXLPipeline", sample_scheduler="EulerDiscreteScheduler",
    sd_scripts_trainer="sdxl_train_network.py",
    pooled_conditioning=True, guessable=True,
)


def _is_v_prediction(keys, tensor, metadata) -> bool:
    """A single file says so with a `v_pred` marker key (as ComfyUI reads it) or its modelspec metadata."""
    return "v_pred" in keys or metadata.get("modelspec.prediction_type", "") in ("v", "v_prediction")


SDXL_V = dataclasses.replace(SDXL, key="sdxlv", name="SDXL v-prediction", prediction_type="v_prediction",
                             checkpoint_marker=None, guessable=False, detect=_is_v_prediction)

FAMILIES = [SDXL, SDXL_V]
