"""What a training step optimises, apart from the model: the noise (offset, multi-resolution, input perturbation),
the timesteps, the loss (l2, l1, Huber, smooth L1 with kohya's schedules) and its weights per timestep (min-SNR,
v-prediction-like, debiased estimation). kohya sd-scripts' meanings and defaults (library/train_util.py,
library/custom_train_functions.py), with every random draw taken from the step's generator, so a resumed run
draws what an uninterrupted one does.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SNR_CAP = 1000.0  # the SNR at t = 0 is infinite; kohya caps it here for its weights


def sample_noise(cfg, latents: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Gaussian noise of the latents' shape, with noise offset (adaptive to the latents' mean when asked) and
    multi-resolution (pyramid) noise."""
    noise = torch.randn(latents.shape, generator=g)
    if cfg.noise_offset:
        offset_noise = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=g)
        if cfg.adaptive_noise_scale:
            mean = latents.detach().float().mean(dim=(2, 3), keepdim=True).abs().cpu()
            noise += (cfg.noise_offset + cfg.adaptive_noise_scale * mean).clamp(min=0.0) * offset_noise
        else:
            noise += cfg.noise_offset * offset_noise
    if cfg.multires_noise_iterations:
        noise = pyramid_noise(noise, cfg.multires_noise_iterations, cfg.multires_noise_discount, g)
    return noise


def pyramid_noise(noise: torch.Tensor, iterations: int, discount: float, g: torch.Generator) -> torch.Tensor:
    """Add noise drawn at ever lower resolutions (each 2-4x smaller, weighted discount^i), upsampled bilinearly,
    then scale back to unit variance (kohya's pyramid_noise_like)."""
    b, c, h, w = noise.shape
    for i in range(iterations):
        r = float(torch.rand(1, generator=g)) * 2 + 2  # rather than always 2x
        hn, wn = max(1, int(h / r**i)), max(1, int(w / r**i))
        coarse = torch.randn((b, c, hn, wn), generator=g)
        noise = noise + F.interpolate(coarse, size=(h, w), mode="bilinear") * discount**i
        if hn == 1 or wn == 1:
            break
    return noise / noise.std()


def sample_timesteps(cfg, scheduler, n: int, g: torch.Generator) -> torch.Tensor:
    high = min(cfg.max_timestep, scheduler.config.num_train_timesteps)
    return torch.randint(cfg.min_timestep, high, (n,), generator=g)


def input_noise(cfg, noise: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The noise the model's input is made with: with input perturbation (ip_noise_gamma) a little more than the
    target's, so the model learns to correct the error its own steps make at sampling time."""
    if not cfg.ip_noise_gamma:
        return noise
    strength = cfg.ip_noise_gamma
    if cfg.ip_noise_gamma_random_strength:
        strength = float(torch.rand(1, generator=g)) * cfg.ip_noise_gamma
    return noise + strength * torch.randn(noise.shape, generator=g).to(noise.device)


def huber_c(cfg, timesteps: torch.Tensor, scheduler) -> torch.Tensor:
    """huber_c per sample, by huber_schedule (kohya's get_huber_threshold_if_needed)."""
    if cfg.huber_schedule == "exponential":
        alpha = -math.log(cfg.huber_c) / scheduler.config.num_train_timesteps
        return torch.exp(-alpha * timesteps.float()) * cfg.huber_scale
    if cfg.huber_schedule == "snr":
        ac = scheduler.alphas_cumprod.index_select(0, timesteps.cpu()).to(timesteps.device)
        sigmas = ((1.0 - ac) / ac) ** 0.5
        return (1 - cfg.huber_c) / (1 + sigmas) ** 2 + cfg.huber_c
    return torch.full(timesteps.shape, cfg.huber_c * cfg.huber_scale, device=timesteps.device)


def elementwise_loss(cfg, pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, scheduler) -> torch.Tensor:
    """The loss of every latent element (kohya's conditional_loss with reduction 'none')."""
    if cfg.loss_type == "l2":
        return F.mse_loss(pred, target, reduction="none")
    if cfg.loss_type == "l1":
        return F.l1_loss(pred, target, reduction="none")
    c = huber_c(cfg, timesteps, scheduler).view(-1, *[1] * (pred.dim() - 1))
    smooth = 2 * (torch.sqrt((pred - target) ** 2 + c**2) - c)
    return c * smooth if cfg.loss_type == "huber" else smooth


def snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    from diffusers.training_utils import compute_snr

    return compute_snr(scheduler, timesteps)


def weigh(cfg, loss: torch.Tensor, timesteps: torch.Tensor, scheduler, v_pred: bool) -> torch.Tensor:
    """Per-image weights by timestep, in kohya's order: min-SNR, v-prediction-like loss, debiased estimation."""
    if not (cfg.min_snr_gamma or cfg.v_pred_like_loss or cfg.debiased_estimation_loss):
        return loss
    s = snr(scheduler, timesteps)
    if cfg.min_snr_gamma:
        w = torch.minimum(s, torch.full_like(s, cfg.min_snr_gamma))
        loss = loss * (w / (s + 1) if v_pred else w / s)
    capped = torch.minimum(s, torch.full_like(s, SNR_CAP))
    if cfg.v_pred_like_loss:
        loss = loss + loss / (capped / (capped + 1)) * cfg.v_pred_like_loss
    if cfg.debiased_estimation_loss:
        loss = loss * (1 / (capped + 1) if v_pred else 1 / torch.sqrt(capped))
    return loss
