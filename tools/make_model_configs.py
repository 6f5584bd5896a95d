"""Write trainer/models/configs/{sd1,sd2,sd2v,sdxl}: the diffusers configs single-file loading needs offline.
Run once; the output is committed. Values are the public SD 1.5 / SD 2.1 / SDXL 1.0 configs."""
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "trainer" / "models" / "configs"
BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}


def unet(**kw):
    base = {"_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
            "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], "downsample_padding": 1,
            "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
            "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4,
            "sample_size": 64, "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3}
    base.update(kw)
    return base


def vae(scaling, size):
    return {"_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
            "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
            "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": size,
            "scaling_factor": scaling, "up_block_types": ["UpDecoderBlock2D"] * 4}


def clip(hidden, inter, heads, layers, act, proj, cls="CLIPTextModel", bos=0, eos=2):
    return {"architectures": [cls], "model_type": "clip_text_model", "hidden_act": act, "hidden_size": hidden,
            "intermediate_size": inter, "num_attention_heads": heads, "num_hidden_layers": layers,
            "max_position_embeddings": 77, "projection_dim": proj, "vocab_size": 49408, "layer_norm_eps": 1e-05,
            "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": 1, "attention_dropout": 0.0,
            "initializer_factor": 1.0, "initializer_range": 0.02, "torch_dtype": "float32"}


def ddim(pred):
    return {"_class_name": "DDIMScheduler", **BETAS, "clip_sample": False, "set_alpha_to_one": False,
            "steps_offset": 1, "prediction_type": pred, "timestep_spacing": "leading"}


def index(cls, parts):
    d = {"_class_name": cls, "_diffusers_version": "0.30.0"}
    d.update(parts)
    return d


SD_PARTS = {"scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"], "safety_checker": [None, None], "feature_extractor": [None, None],
            "requires_safety_checker": False}
FAMILIES = {
    "sd1": {"model_index.json": index("StableDiffusionPipeline", SD_PARTS),
            "unet/config.json": unet(), "vae/config.json": vae(0.18215, 512),
            "text_encoder/config.json": clip(768, 3072, 12, 12, "quick_gelu", 768),
            "scheduler/scheduler_config.json": ddim("epsilon")},
    "sdxl": {"model_index.json": index("StableDiffusionXLPipeline", {
                "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
                "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
                "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                "force_zeros_for_empty_prompt": True}),
             "unet/config.json": unet(addition_embed_type="text_time", addition_embed_type_num_heads=64,
                                      addition_time_embed_dim=256, attention_head_dim=[5, 10, 20],
                                      block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
                                      down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                                      projection_class_embeddings_input_dim=2816, sample_size=128,
                                      transformer_layers_per_block=[1, 2, 10],
                                      up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                                      use_linear_projection=True),
             "vae/config.json": {**vae(0.13025, 1024), "force_upcast": True},
             "text_encoder/config.json": clip(768, 3072, 12, 12, "quick_gelu", 768),
             "text_encoder_2/config.json": clip(1280, 5120, 20, 32, "gelu", 1280, "CLIPTextModelWithProjection", 49406, 49407),
             "scheduler/scheduler_config.json": {"_class_name": "EulerDiscreteScheduler", **BETAS, "steps_offset": 1,
                                                  "prediction_type": "epsilon", "timestep_spacing": "leading",
                                                  "interpolation_type": "linear", "use_karras_sigmas": False}},
}
for name, pred, size in (("sd2", "epsilon", 64), ("sd2v", "v_prediction", 96)):
    FAMILIES[name] = {"model_index.json": index("StableDiffusionPipeline", SD_PARTS),
                      "unet/config.json": unet(attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
                                               use_linear_projection=True, sample_size=size),
                      "vae/config.json": vae(0.18215, 512 if name == "sd2" else 768),
                      "text_encoder/config.json": clip(1024, 4096, 16, 23, "gelu", 512, bos=0, eos=2),
                      "scheduler/scheduler_config.json": ddim(pred)}

if __name__ == "__main__":
    for fam, files in FAMILIES.items():
        for rel, data in files.items():
            p = ROOT / fam / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(json.dumps(data, indent=1) + "\n")
    print("wrote", ", ".join(FAMILIES))
