"""Sample images during training: fixed prompts and seed, rendered from the modules being trained, with one
big part on the device at a time when the run chose memory over speed."""
from __future__ import annotations

from contextlib import contextmanager

import torch

from trainer import placement
from trainer.engine.setup import Run, sample_text


@contextmanager
def on_device(modules, dev):
    """Move modules to `dev` for a phase and each back to where it was afterwards (frozen parts that were
    parked on the host stay out of VRAM for the rest of the run)."""
    homes = [placement.on_device_now(m) for m in modules]
    try:
        yield [placement.to_device(m, dev) for m in modules]
    finally:
        for m, home in zip(modules, homes):
            if not home:
                placement.to_host(m)



def render_samples(run: Run, step: int) -> None:
    """Sample images with fixed prompts and seed, from the modules being trained. Frozen text encoders whose
    prompts were encoded at set-up stay parked; above 512 px the VAE decodes in 512 px tiles (an SDXL decode at
    1024 px needs 3 GB of activations whole, 1 GB tiled). With a quantised base (`TrainConfig.samples_lean`) one
    big part is on the device at a time: the UNet denoises while a VAE of cached latents waits in RAM, then the
    VAE decodes while the UNet waits, so sampling peaks no higher than the steps."""
    cfg, acc, model = run.cfg, run.accelerator, run.model
    if not run.main or not cfg.sample_prompts:
        return
    run.files.samples.mkdir(parents=True, exist_ok=True)
    placement.phase("sample")
    text_encoders = [acc.unwrap_model(t) for t in run.text_encoders]
    saved = model.unet, model.text_encoders
    cond = run.sample_cond
    unet = acc.unwrap_model(run.unet)
    lean = cfg.samples_lean and acc.num_processes == 1  # DDP keeps its parameters where it found them
    vae_parked = not placement.on_device_now(model.vae)  # latents cached: the VAE waits in RAM

    def decode_alone(pipe, i, t, kwargs):  # after the last denoising step the VAE comes, and the UNet goes
        if lean and i == pipe.num_timesteps - 1:
            placement.to_host(unet)
            placement.to_device(model.vae, acc.device)
        return kwargs

    with on_device(([] if lean else [model.vae]) + ([] if cond else text_encoders), acc.device), \
            tiled_decode(model.vae, cfg.resolution), latents_in_vae_dtype(model.vae):
        model.unet, model.text_encoders = unet, text_encoders
        pipe = model.pipeline()
        pipe.set_progress_bar_config(disable=True)
        try:
            n = len(cfg.sample_prompts)
            for i, prompt in enumerate(cfg.sample_prompts):
                run.ev.emit("status", state="sampling", index=i, count=n, step=step,
                            message=f"Rendering sample {i + 1}/{n} at step {step}")
                text = sample_text(cfg, prompt)
                what = ({k: v.to(acc.device) for k, v in cond[text].items()} if cond else {"prompt": text})
                g = torch.Generator(device="cpu").manual_seed(cfg.sample_seed + i)
                try:
                    with torch.no_grad(), acc.autocast():
                        img = pipe(**what, num_inference_steps=cfg.sample_steps, generator=g, height=cfg.resolution,
                                   width=cfg.resolution, callback_on_step_end=decode_alone).images[0]
                finally:
                    if lean and vae_parked:
                        placement.to_host(model.vae)
                    if lean and not placement.on_device_now(unet):
                        placement.to_device(unet, acc.device)
                p = run.files.sample(step, i)
                img.save(p)
                if cfg.tensorboard:
                    import numpy as np

                    acc.get_tracker("tensorboard", unwrap=True).add_image(f"sample_{i}", np.asarray(img), step,
                                                                          dataformats="HWC")
                run.ev.emit("sample", step=step, path=str(p), prompt=text, index=i, count=n)
        finally:
            model.unet, model.text_encoders = saved
            for m in run.trainable:
                m.train()



TILE_PX = 512



@contextmanager
def latents_in_vae_dtype(vae):
    """A bf16 VAE (TrainConfig.vae_precision) decodes the pipeline's latents, which are fp32 outside autocast:
    they are cast to the VAE's dtype where they enter it."""
    def cast(module, args):
        dtype = next(module.parameters()).dtype
        return (args[0].to(dtype), *args[1:]) if args[0].is_floating_point() else None

    hooks = [m.register_forward_pre_hook(cast) for m in (getattr(vae, "post_quant_conv", None), vae.decoder)
             if m is not None]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


@contextmanager
def tiled_decode(vae, resolution: int):
    """The VAE decodes in TILE_PX tiles (overlapping, blended: diffusers' own tiling) for larger images."""
    if resolution <= TILE_PX:
        yield
        return
    saved = vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size = True, TILE_PX, TILE_PX // scale
    try:
        yield
    finally:
        vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size = saved
