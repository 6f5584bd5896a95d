"""Where each big part of a run lives: on the training device, or parked on the host. The loop moves models
and cached tensors only through `to_device` / `to_host` and names its phases with `phase`, so one place
knows, and `python -m trainer memory` (trainer/measure/memory.py) can count what would sit on a GPU even when the
device is the CPU itself. Without a watcher each call is the plain `.to()`."""
from __future__ import annotations

import weakref
from contextlib import contextmanager

HOST = "cpu"
_watchers: list = []
_where: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> True on the device, False parked


def to_device(x, dev, dtype=None):
    """A module or tensor onto the training device (in `dtype` when given); returns it."""
    x = x.to(dev) if dtype is None else x.to(dev, dtype=dtype)
    return _placed(x, True)


def to_host(x):
    """A module or tensor parked in host memory; returns it."""
    return _placed(x.to(HOST), False)


def _placed(x, on_device: bool):
    if not hasattr(x, "untyped_storage"):  # a module (a tensor's place is its own)
        _where[x] = on_device
    for w in _watchers:
        w.placed(x, on_device=on_device)
    return x


def on_device_now(module) -> bool:
    """Whether the module was last put on the device (one never placed: where its first weight is)."""
    if module in _where:
        return _where[module]
    return next(module.parameters()).device.type != HOST


def release() -> None:
    """Hand the memory a finished set-up phase held back to the card: the caching allocator keeps freed blocks
    reserved, and the next phase's first big part (the UNet after the VAE) would otherwise sit beside them."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextmanager
def host_side():
    """What is made inside is made in host memory (a cast of a model that is still parked)."""
    for w in _watchers:
        w.host_side = True
    try:
        yield
    finally:
        for w in _watchers:
            w.host_side = False


def phase(name: str) -> None:
    """The run enters a phase: load, cache latents, cache text encoders, forward, backward, optimizer, sample,
    save."""
    for w in _watchers:
        w.phase(name)


@contextmanager
def watching(watcher):
    _watchers.append(watcher)
    try:
        yield watcher
    finally:
        _watchers.remove(watcher)
