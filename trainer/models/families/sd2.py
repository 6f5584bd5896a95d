"""Stable Diffusion 2.x: the 512 px epsilon model and its 768 px v-prediction variant (LoRAs fit both)."""
from trainer.models.families import Calibration, Family
from trainer.models.families.sd1 import FAMILIES as SD1_FAMILIES

# SD 2.x is SD 1.5's layout at 768 px: SD 1.5's activation figures scaled by pixels (not counted on its own yet)
_SD1, _PIXELS = SD1_FAMILIES[0].calibration, (768 / 512) ** 2
_CAL = Calibration(act_gb=tuple(round(a * _PIXELS, 2) for a in _SD1.act_gb),
                   sample_act_gb=round(_SD1.sample_act_gb * _PIXELS, 2),
                   sample_denoise_act_gb=round(_SD1.sample_denoise_act_gb * _PIXELS, 2),
                   sample_decode_act_gb=round(_SD1.sample_decode_act_gb * _PIXELS, 2),
                   linear_share=_SD1.linear_share, prior_step_s={"cpu": 40.0, "cuda": 0.4})
_COMMON = dict(group="sd2", implementation="diffusers", native_resolution=768, params=(865e6, 340e6, 84e6),
               blocks=(12, 1, 12), resolutions=(64, 1536), calibration=_CAL, checkpoint_te={"te1": ("cond_stage_model.model.", "openclip")},
               tokenizer_pads=("!",))

SD2V_PROBE = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"


def _is_v_prediction(keys, tensor, metadata) -> bool:
    """ComfyUI's test: v-prediction SD2 models have a wide spread in this late norm bias."""
    bias = tensor(SD2V_PROBE) if SD2V_PROBE in keys else None
    return bias is not None and float(bias.float().std(unbiased=False)) > 0.09


FAMILIES = [
    Family(key="sd2", name="SD 2.x (epsilon)", base_version="sd_v2", architecture="stable-diffusion-v2-512/lora",
           prediction_type="epsilon", checkpoint_marker="cond_stage_model.model.", **_COMMON),
    Family(key="sd2v", name="SD 2.x 768-v (v-prediction)", base_version="sd_v2_v",
           architecture="stable-diffusion-v2-768-v/lora", prediction_type="v_prediction", detect=_is_v_prediction,
           **_COMMON),
]
