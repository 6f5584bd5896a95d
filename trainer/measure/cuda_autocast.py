"""CUDA's autocast policy on a CPU run, so that `trainer memory` counts the dtypes a GPU would hold.

The CPU's autocast and CUDA's cast different ops: CUDA runs `group_norm`, `layer_norm`, `softmax` and other
precision-sensitive ops in fp32 (their outputs are fp32, and the next matmul makes its own bf16 copy), while the
CPU has no rule for `group_norm` and keeps a bf16 output. A count under the CPU's rules is too low.

The policy is not written down here: it is read from torch itself. torch registers an autocast kernel for every
op it casts, under the dispatch key `AutocastCUDA` (even in a CPU-only build). While `CudaAutocast` is active,
every op with an `AutocastCUDA` or `AutocastCPU` kernel gets a kernel under `AutocastCPU` (where a CPU run's
autocast happens) that
1. runs the op once on fake CUDA tensors of the same shapes and dtypes (torch's FakeTensorMode: no memory, no
   arithmetic) with CUDA's autocast on, and records which inputs torch's CUDA kernel casts, and to which dtype
   (the plan is kept per op and input dtypes);
2. makes those casts on the real CPU tensors and runs the op without the CPU's autocast.
The casts happen above autograd, as autocast's own do, so gradients and saved tensors are what CUDA's would be.

Not emulated: the autocast weight cache (CUDA keeps one low-precision copy of a trainable leaf tensor per
autocast region; here each use casts anew, which holds the same bytes where a weight is used once per forward).
"""
from __future__ import annotations

import functools
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_unflatten

_NO_CPU_AUTOCAST = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)


def autocast_ops(key: str) -> list[str]:
    """The ops torch registers an autocast kernel for under this dispatch key ('AutocastCUDA', 'AutocastCPU')."""
    return sorted(torch._C._dispatch_get_registrations_for_dispatch_key(key))


def _overload(name: str):
    """torch.ops.aten.<op>.<overload> of 'aten::op.overload'."""
    op, _, overload = name.split("::", 1)[1].partition(".")
    return getattr(getattr(torch.ops.aten, op), overload or "default")


class _Casts(TorchDispatchMode):
    """Under the fake mode: the dtype each input (by position) is copied to."""

    def __init__(self, inputs: dict[int, list[int]]):
        super().__init__()
        self.inputs = inputs  # id(fake input) -> its positions
        self.casts: dict[int, torch.dtype] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and id(args[0]) in self.inputs and "dtype" in kwargs:
            for i in self.inputs[id(args[0])]:
                self.casts.setdefault(i, kwargs["dtype"])
        return func(*args, **kwargs)


class CudaAutocast:
    """While active (a context manager), a CPU run under autocast casts as CUDA's autocast would."""

    def __init__(self):
        self.plans: dict[tuple, dict[int, torch.dtype]] = {}
        self.unprobed: set[str] = set()  # ops the fake CUDA run could not take: run uncast
        self._lib = None

    @staticmethod
    def ops() -> list[str]:
        return sorted(set(autocast_ops("AutocastCUDA")) | set(autocast_ops("AutocastCPU")))

    def __enter__(self):
        self._lib = torch.library.Library("aten", "IMPL")
        with warnings.catch_warnings():  # "overriding a previously registered kernel": that is the point
            warnings.simplefilter("ignore")
            for name in self.ops():
                try:
                    op = _overload(name)
                except AttributeError:  # registered but not exposed to Python
                    continue
                self._lib.impl(name.split("::", 1)[1], functools.partial(self._kernel, op), "AutocastCPU")
        return self

    def __exit__(self, *exc):
        self._lib._destroy()  # the CPU's own autocast kernels are back
        self._lib = None
        return False

    # ------------------------------------------------------------------ the kernel
    def _kernel(self, op, *args, **kwargs):
        leaves, spec = tree_flatten((args, kwargs))
        key = (op, tuple(x.dtype if isinstance(x, torch.Tensor) else x if isinstance(x, torch.dtype) else None
                         for x in leaves))
        plan = self.plans.get(key)
        if plan is None:
            plan = self.plans[key] = self._probe(op, leaves, spec)
        if plan:
            leaves = [x.to(plan[i]) if i in plan else x for i, x in enumerate(leaves)]
        args, kwargs = tree_unflatten(leaves, spec)
        with torch._C._ExcludeDispatchKeyGuard(_NO_CPU_AUTOCAST):
            return op(*args, **kwargs)

    def _probe(self, op, leaves, spec) -> dict[int, torch.dtype]:
        """Which inputs CUDA's autocast kernel of `op` casts, and to what: run it on fake CUDA tensors."""
        from torch._subclasses.fake_tensor import FakeTensorMode

        dtype = torch.get_autocast_dtype("cpu")
        with _disable_current_modes():  # the memory counter must not see the probe
            fake = FakeTensorMode()
            with fake:
                mirrors = [torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="cuda")
                           if isinstance(x, torch.Tensor) else x for x in leaves]
            positions: dict[int, list[int]] = {}
            for i, x in enumerate(leaves):
                if isinstance(x, torch.Tensor):
                    positions.setdefault(id(x), []).append(i)
            casts = _Casts({id(mirrors[p[0]]): p for p in positions.values()})
            was = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
            torch.set_autocast_enabled("cuda", True)
            torch.set_autocast_dtype("cuda", dtype)
            try:
                a, k = tree_unflatten(mirrors, spec)
                with fake, casts:
                    op(*a, **k)
            except Exception:  # no fake kernel, a data-dependent op, or an op CUDA's autocast refuses
                self.unprobed.add(str(op))
                return {}
            finally:
                torch.set_autocast_enabled("cuda", was[0])
                torch.set_autocast_dtype("cuda", was[1])
        return casts.casts
