"""The training loop, in phases: `setup` (trainer/engine/setup.py) builds one `Run`, `train_step` is the maths,
`after_step` decides (log, sample, save, stop) with small predicates, `finish` saves and exports. `train()` reads
top to bottom.

Randomness is a function of (seed, micro-step, rank): noise, timesteps, dropout and captions of step N are
the same whether the run got there in one go or was stopped and resumed.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trainer.data.cache import encode_pixels
from trainer.data.loader import make_loader, mix
from trainer.engine import checkpoint as ckpt
from trainer.engine import objective
from trainer import placement
from trainer.engine.faults import maybe_inject
from trainer.engine.sampling import render_samples
from trainer.engine.setup import Run, TrainingError, setup
from trainer.events import take_request
from trainer.models import lora
from trainer.models.load import LoadedModel
from trainer.models.prompts import encode_prompts
from trainer.recipe import optimizers
from trainer.recipe.config import TrainConfig
from trainer.runfiles import step_of

log = logging.getLogger(__name__)


@dataclass
class State:
    step: int = 0
    epoch: int = 1
    loss_sum: float | torch.Tensor = 0.0
    loss_n: int = 0
    nonfinite: bool | torch.Tensor = False  # kept on the device: read only at log intervals
    t0: float = field(default_factory=time.time)
    step0: int = 0
    reported: float = 0.0  # time of the last progress report


def train(cfg: TrainConfig, run_dir: str | Path | None = None, resume: bool = False, echo=print,
          model: LoadedModel | None = None, on_setup=None) -> Path:
    """Train a LoRA; return the exported file (a sweep: the run folder, holding one file per variant; the run
    folder when stopped). Raise TrainingError on failure. `model` skips loading (the benchmark passes random-weight
    full-size models built in memory); `on_setup(run)` sees the set-up run (a sweep: each variant's; the
    measurements read what it built)."""
    run_dir = Path(run_dir or cfg.output_dir)
    if cfg.variants:  # several networks on one base: trainer/engine/sweep.py
        from trainer.engine.sweep import setup_sweep

        lead, runs = setup_sweep(cfg, run_dir, echo, model)
    else:
        run = setup(cfg, run_dir, echo, model)
        lead, runs = run, [run]
    for run in runs if on_setup else ():
        on_setup(run)
    states = restore_all(runs) if resume else [State() for _ in runs]
    outs = [lead.files.final(r.cfg.output_name) for r in runs]
    result = outs[0] if len(runs) == 1 else lead.files.root
    total = runs[0].total_steps
    if resume and states[0].step >= total and all(o.is_file() for o in outs):  # nothing left: files stay as they were
        lead.ev.emit("done", path=str(outs[0]), paths=[str(o) for o in outs], step=states[0].step,
                     message=f"This run had already finished: {result}")
        lead.accelerator.end_training()
        return result
    batches = batch_iterator(runs[0], states[0].step)
    what = f"{len(runs)} variants x {total} steps" if len(runs) > 1 else f"{total} steps"
    lead.ev.emit("status", state="training", message=f"Training {what} ({runs[0].steps_per_epoch} per epoch)",
                 total=total, device=lead.accelerator.device.type, precision=lead.accelerator.mixed_precision,
                 family=runs[0].model.family, variants=len(runs))  # what the app's duration estimates are keyed by
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=states[0].step, disable=not runs[0].main, desc="train", dynamic_ncols=True)
    try:
        while states[0].step < total:
            train_steps(runs, states, batches)
            bar.update(1)
            if after_steps(lead, runs, states):
                lead.accelerator.end_training()  # flushes the TensorBoard writer
                return lead.files.root
    except torch.cuda.OutOfMemoryError:
        raise TrainingError(
            "The GPU ran out of memory. Lower batch_size or resolution, turn on gradient_checkpointing, use "
            "optimizer = 'adamw8bit', cache latents, or pick the low-VRAM preset. The last checkpoint is kept."
        ) from None
    finally:
        bar.close()  # ends the progress line, so an error message starts on a line of its own
    finish(lead, runs, states)
    return result


def restore_all(runs: list[Run]) -> list[State]:
    """Each network's state at the last step that all of them saved (a sweep interrupted while saving has some
    variants one checkpoint ahead: they go back to the common one)."""
    if len(runs) == 1:
        return [restore_from(runs[0], runs[0].files.latest_checkpoint())]
    steps = [{step_of(d): d for d in r.files.checkpoint_dirs()} for r in runs]
    common = set.intersection(*(set(s) for s in steps))
    if not common:
        return [restore_from(r, None) for r in runs]
    return [restore_from(r, s[max(common)]) for r, s in zip(runs, steps)]


def restore_from(run: Run, last: Path | None) -> State:
    """The state of the checkpoint folder `last` (weights, optimizer, schedule, step); step 0 when there is none."""
    if last is None:
        run.ev.emit("warning", message="--resume given but no checkpoint found: starting from step 0.")
        return State()
    try:
        saved_parts, saved, opt_state = ckpt.read_checkpoint(last)
    except ValueError as e:
        raise TrainingError(str(e)) from None
    for name, m in zip(run.alphas, run.trainable):
        lora.load_lora_state(run.accelerator.unwrap_model(m), saved_parts[name][0])
    if opt_state is not None:
        run.optimizer.load_state_dict(opt_state)
        opt = schedule_free(run)
        if opt is not None:  # saved with its averaged weights: back to the ones it trains
            opt.train()
    if run.ema is not None and not run.ema.load(last):
        run.ev.emit("warning", message=f"{last.name} holds no EMA: the average starts again from the resumed weights.")
    run.scheduler.load_state_dict(saved["scheduler"])
    run.info["started_at"] = saved.get("started_at", run.info["started_at"])  # the run began then, not now
    step = int(saved["step"])
    run.ev.emit("log", message=f"Resumed from {last.name} at step {step}/{run.total_steps}")
    return State(step=step, step0=step)


def batch_iterator(run: Run, step: int):
    """Batches from optimizer step `step` to the end, loaded ahead by DataLoader workers."""
    ga, acc = run.cfg.gradient_accumulation, run.accelerator
    loader = make_loader(run.data, acc.num_processes, step * ga, run.total_steps * ga, pin_memory=acc.device.type == "cuda")
    return iter(acc.prepare(loader))


def train_step(run: Run, state: State, batches) -> None:
    """One optimizer step: `gradient_accumulation` batches through noise, conditioning, loss and backward."""
    train_steps([run], [state], batches)


def train_steps(runs: list[Run], states: list[State], batches) -> None:
    """One optimizer step of each network (a sweep's variants) on the same batches."""
    ga, step = runs[0].cfg.gradient_accumulation, states[0].step
    maybe_inject(step + 1, "step")
    for micro in range(step * ga, (step + 1) * ga):
        for state, loss in zip(states, micro_steps(runs, next(batches), micro)):
            state.nonfinite |= ~torch.isfinite(loss)
            state.loss_sum += loss
            state.loss_n += 1
    for run, state in zip(runs, states):
        state.epoch = run.epoch_of(micro)
        state.step += 1
        if run.ema is not None:
            run.ema.update(state.step)


def micro_step(run: Run, batch: dict, micro: int) -> torch.Tensor:
    """One batch forward and backward, then the optimizer when the accumulation is complete. Returns the loss."""
    return micro_steps([run], batch, micro)[0]


def micro_steps(runs: list[Run], batch: dict, micro: int) -> list[torch.Tensor]:
    """One batch through each network in turn (one network's activations in memory at a time), inside one
    accumulation window: accelerate counts the micro-step once, whatever the number of networks."""
    acc = runs[0].accelerator
    reg = batch.get("reg") if "train" in batch else None
    batch = batch["train"] if "train" in batch else batch
    with acc.accumulate(*[m for run in runs for m in run.trainable]):
        return [network_step(run, batch, reg, micro) for run in runs]


def network_step(run: Run, batch: dict, reg: dict | None, micro: int) -> torch.Tensor:
    """One network's forward and backward of a batch (with class images: their loss too, weighted by
    prior_loss_weight, so each step sees both), then its optimizer when the accumulation is complete. Returns the
    training loss. Every draw is seeded by (seed, micro-step): each network of a sweep draws what it would alone."""
    cfg, acc = run.cfg, run.accelerator
    torch.manual_seed(mix(cfg.seed, micro, acc.process_index, 1))  # LoRA dropout
    placement.phase("forward")
    loss = batch_loss(run, batch, sample_generators(cfg.seed, micro, batch["slot"]))
    placement.phase("backward")
    acc.backward(loss)
    if reg is not None and cfg.prior_loss_weight > 0:
        # a second backward adds its gradient to the first: the gradient of loss + w * prior loss, with one
        # batch's activations in memory at a time
        acc.backward(cfg.prior_loss_weight * batch_loss(run, reg, sample_generators(cfg.seed, micro, reg["slot"], 7)))
    placement.phase("optimizer")
    if acc.sync_gradients and cfg.max_grad_norm > 0:
        acc.clip_grad_norm_([p for g_ in run.optimizer.param_groups for p in g_["params"]], cfg.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def sample_generators(seed: int, micro: int, slots: torch.Tensor, *salt: int) -> list[torch.Generator]:
    """One generator per sample, seeded by its global slot in the micro-step's batch: a sample gets the same noise
    and timestep whichever process trains it and however the batch is shared (the first slot's is the seed a
    batch of one always had)."""
    return [torch.Generator().manual_seed(mix(seed, micro, int(s), *salt)) for s in slots]


def draw(cfg, sched, latents: torch.Tensor, gens: list[torch.Generator]):
    """(noise, timesteps, the noise the input is made with) of a batch, each sample from its own generator, in
    the order noise, timestep, input perturbation."""
    parts = []
    for k, g in enumerate(gens):
        noise = objective.sample_noise(cfg, latents[k : k + 1], g)
        t = objective.sample_timesteps(cfg, sched, 1, g)
        parts.append((noise, t, objective.input_noise(cfg, noise, g)))
    return [torch.cat(p) for p in zip(*parts)]


def batch_loss(run: Run, batch: dict, gens: list[torch.Generator] | None, timesteps: torch.Tensor | None = None,
               noise: torch.Tensor | None = None) -> torch.Tensor:
    """The diffusion loss of a batch: noise at random timesteps in [min_timestep, max_timestep) drawn from each
    sample's generator (or the given ones, for validation), predicted by the UNet; the loss, its weights per
    timestep and the noise options are trainer/engine/objective.py's, the masks weigh each latent pixel. The
    samples' losses are summed with their weights (1 / batch size in one process; see loader.shares)."""
    cfg, acc, model = run.cfg, run.accelerator, run.model
    dev, sched = acc.device, model.noise_scheduler
    latents = batch["latents"] if "latents" in batch else encode_pixels(model.vae, batch["pixels"])
    latents = latents.to(dev)
    if noise is None:
        noise, timesteps, noise_in = draw(cfg, sched, latents, gens)
    else:  # validation passes its fixed noise and timesteps, and measures them as they are
        noise_in = noise
    noise, timesteps = noise.to(dev), timesteps.to(dev)
    noisy = sched.add_noise(latents, noise_in.to(dev), timesteps)
    v_pred = model.prediction_type == "v_prediction"
    target = sched.get_velocity(latents, noise, timesteps) if v_pred else noise
    hs, pooled = conditioning(run, batch["caption"])
    kwargs = {}
    if model.spec.pooled_conditioning:
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": batch["time_ids"].to(dev)}
    with acc.autocast():
        pred = run.unet(noisy.to(run.weight_dtype), timesteps, hs.to(run.weight_dtype), **kwargs).sample
    loss = objective.elementwise_loss(cfg, pred.float(), target.float(), timesteps, sched)
    if "mask" in batch:  # kohya's masked loss: weight each latent pixel, then average as before
        loss = loss * batch["mask"].to(dev)
    loss = objective.weigh(cfg, loss.mean(dim=[1, 2, 3]), timesteps, sched, v_pred)
    return (loss * batch["weight"].to(dev)).sum()


def conditioning(run: Run, captions: list[str]):
    """(encoder hidden states, SDXL pooled embedding) of a batch's captions: from the cache or the encoders."""
    dev = run.accelerator.device
    if run.text_cache is not None:
        hs = torch.stack([run.text_cache[c][0] for c in captions]).to(dev)
        pooled = torch.stack([run.text_cache[c][1] for c in captions]).to(dev) if run.model.spec.pooled_conditioning else None
        return hs, pooled
    with torch.set_grad_enabled(run.cfg.train_text_encoder):
        return encode_prompts(run.model, run.text_encoders, captions, run.cfg.clip_skip, dev)


LOG_INTERVAL_S = 2.0  # log_every_steps = 0: a report about this often (host clock: no wait for the device)


def due(n: int, state: State, total: int, seconds: float | None = None) -> bool:
    """The one interval rule: True at multiples of `n` steps before the last step (the last step has its own save,
    samples and report). With n = 0 and `seconds`, by the clock instead: the first step of this attempt, then
    every `seconds`."""
    if n:
        return state.step % n == 0 and state.step < total
    if seconds is None:
        return False
    return state.step == state.step0 + 1 or time.time() - state.reported >= seconds


def report_due(every_n: int, state: State, total: int) -> bool:
    """Progress reports: at the interval (steps, or about every LOG_INTERVAL_S when 0), and always at the last step."""
    return state.step == total or due(every_n, state, total, LOG_INTERVAL_S)


def after_step(run: Run, state: State) -> bool:
    """Log, sample, save and poll the user's requests. True when the run should stop now."""
    return after_steps(run, [run], [state])


def after_steps(lead, runs: list[Run], states: list[State]) -> bool:
    """after_step for the networks of a run (a sweep's variants, all at the same step): `lead` is the run's own
    event log, files and accelerator (the run itself, or a sweep's Base)."""
    cfg, step, total = lead.cfg, states[0].step, runs[0].total_steps
    if report_due(cfg.log_every_steps, states[0], total):
        report_progress(lead, runs, states)
    if due(cfg.sample_every_steps, states[0], total):
        for run in runs:
            with averaged_weights(run), ema_weights(run):
                render_samples(run, step)
    want_save, want_stop = poll_requests(lead.accelerator, lead.files.root)
    saving = want_save or want_stop or due(cfg.save_every_steps, states[0], total)
    validating = due(cfg.validation_every_steps, states[0], total) or (saving and not cfg.validation_every_steps)
    for run in runs if validating or saving else ():
        with averaged_weights(run):
            if validating:
                with ema_weights(run):
                    validate(run, step)
            if saving:
                ckpt.save(run, step)  # the training weights to resume from, the EMA ones in the file
    if want_stop:
        lead.ev.emit("stopped", step=step, message=f"Stopped at step {step}; resume to continue.")
    return want_stop


def schedule_free(run: Run):
    """The run's schedule-free optimizer (unwrapped from accelerate), or None."""
    if not optimizers.get(run.cfg.optimizer).schedule_free:
        return None
    return getattr(run.optimizer, "optimizer", run.optimizer)


def ema_weights(run: Run):
    """The EMA weights in the model for the block (samples, validation), when the run keeps an EMA."""
    return run.ema.swapped_in() if run.ema is not None else nullcontext()


@contextmanager
def averaged_weights(run: Run):
    """With a schedule-free optimizer, its averaged weights for the block (what samples, validation, checkpoints and
    the export use), then the ones it trains again. Nothing happens with any other optimizer."""
    opt = schedule_free(run)
    if opt is None:
        yield
        return
    opt.eval()
    try:
        yield
    finally:
        opt.train()


def report_progress(lead, runs: list[Run], states: list[State]) -> None:
    """One progress event: the mean loss since the last report (a sweep: each variant's, by name, and the first's
    as `loss`), the speed and the time left."""
    losses = {}
    for run, state in zip(runs, states):
        if bool(state.nonfinite):  # the only host sync: at log intervals
            who = f" (variant {run.info['variant']})" if run.info.get("variant") else ""
            raise TrainingError(
                f"The loss became NaN/inf at step {state.step}{who}. Likely causes: learning rate too high "
                f"(unet_lr={run.cfg.unet_lr:g}), fp16 overflow (try bf16 or fp32), or a broken base model. "
                "Lower the learning rate and resume from the last checkpoint."
            )
        losses[run.info.get("variant", "")] = float(state.loss_sum) / max(1, state.loss_n)
        state.loss_sum, state.loss_n, state.reported = 0.0, 0, time.time()
    state, run = states[0], runs[0]
    elapsed = time.time() - state.t0
    its = (state.step - state.step0) / elapsed if elapsed > 0 else 0.0
    eta = (run.total_steps - state.step) / its if its > 0 else None
    lr = run.scheduler.get_last_lr()[0]
    avg = next(iter(losses.values()))
    more = {"losses": losses} if len(runs) > 1 else {}
    lead.ev.emit("progress", step=state.step, total=run.total_steps, epoch=state.epoch, loss=avg, lr=lr, its=its,
                 eta=eta, **more, **cuda_memory(lead.accelerator.device))
    if lead.cfg.tensorboard:
        lead.accelerator.log({"lr": lr, **{f"loss/{k}" if k else "loss": v for k, v in losses.items()}}, step=state.step)


VALIDATION_TIMESTEPS = 4  # per image, spread evenly over [min_timestep, max_timestep)


@torch.no_grad()
def validate(run: Run, step: int) -> float | None:
    """The loss on the held-out images with the same noise and timesteps every time (seeded by each image's
    content, not by the run's seed), so the curve compares across steps and across runs. Every rank runs it
    (the model may be DDP-wrapped); rank 0 reports it."""
    from trainer.data.loader import collate

    val, cfg = run.data.val, run.cfg
    if val is None:
        return None
    modes = [m.training for m in run.trainable]
    for m in run.trainable:
        m.eval()  # no LoRA dropout while measuring
    losses = []
    try:
        captions = val.fixed_captions()
        channels, scale = run.model.unet.config.in_channels, run.model.vae_scale_factor
        for i, it in enumerate(val.items):
            batch = collate([val[(0, 0, i, False, 1.0)]])
            batch["caption"] = [captions[i]]
            g = torch.Generator().manual_seed(mix(int(val.hashes[i][:15], 16), 43))
            bw, bh = val.buckets[i]
            for k in range(VALIDATION_TIMESTEPS):
                t = cfg.min_timestep + int((k + 0.5) * (cfg.max_timestep - cfg.min_timestep) / VALIDATION_TIMESTEPS)
                noise = torch.randn((1, channels, bh // scale, bw // scale), generator=g)
                losses.append(float(batch_loss(run, batch, None, torch.tensor([t]), noise)))
    finally:
        for m, was in zip(run.trainable, modes):
            m.train(was)
    mean = sum(losses) / len(losses)
    run.ev.emit("validation", step=step, loss=mean, images=len(val.items),
                message=f"Validation loss {mean:.4f} at step {step} ({len(val.items)} image(s))")
    if cfg.tensorboard:
        run.accelerator.log({"val_loss": mean}, step=step)
    return mean


def cuda_memory(device) -> dict:
    """What the page's spill warning reads (trainer/measure/spill.py): the allocator's reserved memory and the
    card's own memory, in GB; nothing off CUDA."""
    if getattr(device, "type", "") != "cuda":
        return {}
    return {"reserved_gb": round(torch.cuda.memory_reserved(device) / 2**30, 2),
            "dedicated_gb": round(torch.cuda.get_device_properties(device).total_memory / 2**30, 2)}


def poll_requests(accelerator, run_dir: Path) -> tuple[bool, bool]:
    """(save now, stop) as decided by rank 0, so every rank acts on the same step."""
    flags = [False, False]
    if accelerator.is_main_process:
        flags = [take_request(run_dir, "save"), take_request(run_dir, "stop")]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        flags = broadcast_object_list(flags, from_process=0)
    return bool(flags[0]), bool(flags[1])


def finish(lead, runs: list[Run], states: list[State]) -> list[Path]:
    """Final checkpoint, final samples, the exported file of each network in the run folder, the done event."""
    outs = []
    for run in runs:
        with averaged_weights(run):
            with ema_weights(run):
                validate(run, run.total_steps)
            final = ckpt.save(run, run.total_steps)
            with ema_weights(run):
                render_samples(run, run.total_steps)
        out = lead.files.final(run.cfg.output_name)
        if run.main:
            run.ev.emit("status", state="exporting", message=f"Writing {out.name}")
            raw = ckpt.raw_file(run)
            for f in [out] + ([lead.files.final(raw.stem)] if raw else []):
                tmp = f.with_suffix(".tmp")
                shutil.copyfile(final / f.name, tmp)
                os.replace(tmp, f)
        outs.append(out)
    if runs[0].main:
        lead.ev.emit("done", path=str(outs[0]), paths=[str(o) for o in outs], step=runs[0].total_steps,
                     message=f"Finished: {', '.join(str(o) for o in outs)}")
    lead.accelerator.wait_for_everyone()
    lead.accelerator.end_training()
    return outs
