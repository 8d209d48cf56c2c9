"""CUDA on a CPU for the duration of a ``with`` block: what Megatron-Bridge's ``pretrain()`` needs to run here.

:func:`cuda_on_cpu` is the device shim of ``xtoken rehearse``.  Inside the block Bridge's training
loop (setup, ``Float16Module``, Megatron DDP, optimizer, schedule, checkpointing) runs unmodified on
the CPU with gloo; on exit every attribute is restored and the torch-function mode popped.  Nothing
happens at import; the GPU path never imports this module.  What it redirects (:data:`REDIRECTS`):

* **allocations and copies** — a ``torch.overrides.TorchFunctionMode`` rewrites every ``device=``
  argument that names CUDA (``"cuda"``, ``"cuda:N"``, ``torch.device("cuda", N)``, a bare integer)
  to ``"cpu"`` (tensor factories, ``*_like``, ``new_*``, ``Tensor.to``), makes ``Tensor.cuda()`` and
  ``Tensor.pin_memory()`` return the tensor, drops ``pin_memory=True``, and makes ``Tensor.type()``
  report ``torch.cuda.*`` names (megatron-core picks its optimizer/clipping paths by those strings)
  and accept them; ``torch.empty*`` returns zero-filled memory (the distributed optimizer saves its
  buckets' uninitialized padding: two equal runs would write different checkpoints);
* **``torch.cuda``** — ``is_available`` (True), ``device_count`` (1), ``current_device`` (0),
  ``set_device``, ``synchronize``, ``empty_cache``, ``manual_seed``/``manual_seed_all``/``seed``/
  ``initial_seed`` and ``get_rng_state``/``set_rng_state`` (also under ``torch.cuda.random``: the
  CPU generator), ``Stream``/``Event``/``stream()``/``current_stream``/``default_stream``/
  ``set_stream``, memory statistics (``memory_allocated`` … ``mem_get_info``, all 0), device
  name/properties/capability, ``is_current_stream_capturing``, ``nvtx`` ranges;
* **``torch.accelerator``** — ``current_accelerator`` (CPU: the PyPI torch is a CUDA build and Adam's
  graph-capture check would call the driver), ``current_stream``, ``current_device_index``,
  ``set_device_index``, ``synchronize``;
* **``torch.distributed``** — ``init_process_group``/``new_group``/``new_subgroups_by_enumeration``
  with ``backend="nccl"`` (or NCCL options) get gloo; ``barrier(device_ids=…)`` drops the ids;
* **the DataLoader's pin-memory thread** (outside the thread-local mode): its ``pin_memory`` is the identity;
* **megatron-core** — the model-parallel RNG tracker's CUDA state get/set (CPU generator states),
  the unfused softmax's default causal mask (built on the CPU), ``compile_helpers`` (runs ``make``
  in the wheel, which ships the helper prebuilt) and Bridge's ``_warmup_jit_function`` (compiles
  on ``"cuda"``) become no-ops; its torch norms (the local layer spec, no TE) accept sequence
  parallelism and mark their weights ``sequence_parallel`` as TE's norms do (megatron-core asserts
  instead; the gradients of those weights are then summed over the TP group by ``finalize_model_grads``).

Two megatron-core 0.19.2 defects of the distributed optimizer on torch's Adam (the fallback without
TE or Apex; a GPU run uses TE's FusedAdam) are patched in the same scope: loading asserts before
Adam has state, and a resumed run shares one step tensor among all parameters, reset to the
pre-load step (see :func:`_zero_state_before_loading`, :func:`_own_step_per_param`).

Limit: a ``TorchFunctionMode`` is off inside its own handler, so a graph run by ``Tensor.backward()``
or ``torch.autograd.backward`` (both dispatched through the mode) runs *without* the redirect;
Megatron's schedules call the autograd engine directly (``custom_backward``), which keeps it on.

Not redirected, so never run here: CUDA kernels, transformer-engine layers, NCCL, CUDA graphs.
Each stub is a distinct function object (one object under several names confuses torch's compiler).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["cuda_on_cpu", "REDIRECTS", "CudaToCpuMode", "is_cuda_device"]

#: One line per redirected family (the docs' list, ``docs/megatron-bridge.md``).
REDIRECTS = (
    "device= arguments naming CUDA (str, torch.device, int) -> cpu, in tensor factories, *_like, new_*, Tensor.to",
    "Tensor.cuda(), Tensor.pin_memory() -> the tensor itself; pin_memory=True dropped",
    "Tensor.type() -> torch.cuda.* names (and accepts them)",
    "torch.empty, empty_like, empty_strided, Tensor.new_empty -> zero-filled (deterministic checkpoint padding)",
    "torch.cuda.is_available/device_count/current_device/set_device/synchronize/empty_cache",
    "torch.cuda RNG (manual_seed*, seed, initial_seed, get/set_rng_state, also torch.cuda.random) -> CPU generator",
    "torch.cuda.Stream/Event/stream/current_stream/default_stream/set_stream -> inert objects",
    "torch.cuda memory statistics and device properties -> zeros / a CPU description",
    "torch.cuda.is_current_stream_capturing, torch.cuda.nvtx ranges",
    "torch.accelerator.current_accelerator/current_stream/current_device_index/set_device_index/synchronize",
    "torch.distributed init_process_group/new_group/new_subgroups_by_enumeration: nccl -> gloo; barrier(device_ids) dropped",
    "DataLoader pin-memory thread: pin_memory -> identity",
    "megatron-core RNG tracker CUDA state get/set -> CPU generator",
    "megatron-core fused_softmax.get_default_causal_mask -> built on the CPU",
    "megatron-core compile_helpers, Bridge initialize._warmup_jit_function -> no-ops",
    "megatron-core distributed optimizer on torch's Adam (no TE/Apex): zero Adam state before loading, one step per parameter after",
    "megatron-core torch norms (local layer spec) under sequence parallelism: built, weights marked sequence_parallel as TE's",
)

_CPU = torch.device("cpu")


def is_cuda_device(d: Any) -> bool:
    """Whether ``d`` (str, ``torch.device`` or int) names a CUDA device."""
    if isinstance(d, torch.device):
        return d.type == "cuda"
    if isinstance(d, str):
        return d == "cuda" or d.startswith("cuda:")
    return isinstance(d, int) and not isinstance(d, bool)


def _fix_device(d: Any) -> Any:
    return _CPU if is_cuda_device(d) else d


_TO_FUNCS = {torch.Tensor.to}
_CUDA_FUNCS = {torch.Tensor.cuda}
_PIN_FUNCS = {torch.Tensor.pin_memory}
_TYPE_FUNCS = {torch.Tensor.type}
_EMPTY_FUNCS = {torch.empty, torch.empty_like, torch.empty_strided, torch.Tensor.new_empty}


def _cpu_type_name(name: str) -> str:
    return name.replace("torch.cuda.", "torch.", 1) if name.startswith("torch.cuda.") else name


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to the CPU (see the module doc)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = dict(kwargs or {})
        if func in _CUDA_FUNCS or func in _PIN_FUNCS:
            return args[0]
        if func in _TYPE_FUNCS:
            if len(args) == 1 and "dtype" not in kwargs:
                name = func(*args, **kwargs)
                return name.replace("torch.", "torch.cuda.", 1) if isinstance(name, str) and not name.startswith("torch.cuda.") else name
            if len(args) > 1 and isinstance(args[1], str):
                args = (args[0], _cpu_type_name(args[1]), *args[2:])
            if isinstance(kwargs.get("dtype"), str):
                kwargs["dtype"] = _cpu_type_name(kwargs["dtype"])
            return func(*args, **kwargs)
        if "device" in kwargs:
            kwargs["device"] = _fix_device(kwargs["device"])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func in _EMPTY_FUNCS:  # zero-filled: uninitialized padding would make equal runs' checkpoints differ
            out = func(*args, **kwargs)
            if isinstance(out, torch.Tensor) and out.device.type == "cpu":
                out.zero_()
            return out
        if func in _TO_FUNCS and len(args) > 1 and (isinstance(args[1], (str, torch.device)) or
                                                    (isinstance(args[1], int) and not isinstance(args[1], bool))):
            args = (args[0], _fix_device(args[1]), *args[2:])
        return func(*args, **kwargs)


# ---- inert CUDA objects ------------------------------------------------------------------------------


class _Stream:
    """A CUDA stream that is the CPU's one ordered stream."""

    def __init__(self, device: Any = None, priority: int = 0, **_: Any) -> None:
        self.device = _CPU
        self.priority = priority

    def synchronize(self) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> "_Event":
        return event if event is not None else _Event()

    def query(self) -> bool:
        return True

    def is_capturing(self) -> bool:
        return False

    def __enter__(self) -> "_Stream":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, _Stream)

    def __hash__(self) -> int:
        return 0


class _Event:
    """A CUDA event on the CPU: always complete; ``elapsed_time`` from wall-clock records."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False, **_: Any) -> None:
        self._t = 0.0

    def record(self, stream: Any = None) -> None:
        import time

        self._t = time.perf_counter()

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: "_Event") -> float:
        return (end._t - self._t) * 1000.0


_THE_STREAM = _Stream()


class _Props:
    name = "CPU (xtoken rehearse: CUDA redirected)"
    major, minor = 9, 0
    total_memory = 0
    multi_processor_count = 1
    uuid = "cpu"


def _make_stubs() -> dict[str, Any]:
    """``torch.cuda`` replacements; every one a distinct function object."""

    def is_available() -> bool:
        return True

    def device_count() -> int:
        return 1

    def current_device() -> int:
        return 0

    def set_device(device: Any) -> None:
        return None

    def synchronize(device: Any = None) -> None:
        return None

    def empty_cache() -> None:
        return None

    def manual_seed(seed: int) -> None:
        torch.default_generator.manual_seed(int(seed))

    def manual_seed_all(seed: int) -> None:
        torch.default_generator.manual_seed(int(seed))

    def seed() -> None:
        torch.default_generator.seed()

    def seed_all() -> None:
        torch.default_generator.seed()

    def initial_seed() -> int:
        return torch.default_generator.initial_seed()

    def get_rng_state(device: Any = "cuda") -> torch.Tensor:
        return torch.default_generator.get_state()

    def get_rng_state_all() -> list:
        return [torch.default_generator.get_state()]

    def set_rng_state(new_state: torch.Tensor, device: Any = "cuda") -> None:
        torch.default_generator.set_state(new_state)

    def set_rng_state_all(new_states: list) -> None:
        torch.default_generator.set_state(new_states[0])

    def stream(stream: Any = None) -> Any:
        return contextlib.nullcontext(stream)

    def current_stream(device: Any = None) -> _Stream:
        return _THE_STREAM

    def default_stream(device: Any = None) -> _Stream:
        return _THE_STREAM

    def set_stream(stream: Any) -> None:
        return None

    def is_current_stream_capturing() -> bool:
        return False

    def memory_allocated(device: Any = None) -> int:
        return 0

    def max_memory_allocated(device: Any = None) -> int:
        return 0

    def memory_reserved(device: Any = None) -> int:
        return 0

    def max_memory_reserved(device: Any = None) -> int:
        return 0

    def reset_peak_memory_stats(device: Any = None) -> None:
        return None

    def reset_max_memory_allocated(device: Any = None) -> None:
        return None

    def memory_stats(device: Any = None) -> dict:
        return {}

    def mem_get_info(device: Any = None) -> tuple[int, int]:
        return (0, 0)

    def get_device_properties(device: Any = None) -> _Props:
        return _Props()

    def get_device_name(device: Any = None) -> str:
        return _Props.name

    def get_device_capability(device: Any = None) -> tuple[int, int]:
        return (_Props.major, _Props.minor)

    def is_initialized() -> bool:
        return True

    def init() -> None:
        return None

    return {k: v for k, v in locals().items() if callable(v)}


def _make_nvtx_stubs() -> dict[str, Any]:
    def range_push(msg: str) -> int:
        return 0

    def range_pop() -> int:
        return 0

    def mark(msg: str) -> None:
        return None

    def range(msg: str, *args: Any, **kwargs: Any) -> Any:
        return contextlib.nullcontext()

    return {"range_push": range_push, "range_pop": range_pop, "mark": mark, "range": range}


def _make_accelerator_stubs() -> dict[str, Any]:
    def current_accelerator(check_available: bool = False) -> torch.device:
        return torch.device("cpu")

    def current_stream(device: Any = None) -> _Stream:
        return _THE_STREAM

    def current_device_index() -> int:
        return 0

    def set_device_index(device: Any) -> None:
        return None

    def synchronize(device: Any = None) -> None:
        return None

    return {k: v for k, v in locals().items() if callable(v)}


def _make_dist_wrappers(dist: Any) -> dict[str, Any]:
    orig_init, orig_new_group, orig_barrier = dist.init_process_group, dist.new_group, dist.barrier
    orig_subgroups = dist.new_subgroups_by_enumeration

    def _gloo(kwargs: dict) -> dict:
        b = kwargs.get("backend")
        if b is not None and "nccl" in str(b).lower():
            kwargs["backend"] = "gloo"
        kwargs.pop("pg_options", None)
        kwargs.pop("device_id", None)
        return kwargs

    def init_process_group(*args: Any, **kwargs: Any) -> Any:
        if args and isinstance(args[0], str) and "nccl" in args[0].lower():
            args = ("gloo", *args[1:])
        return orig_init(*args, **_gloo(kwargs))

    def new_group(*args: Any, **kwargs: Any) -> Any:
        if len(args) >= 3 and args[2] is not None and "nccl" in str(args[2]).lower():
            args = (*args[:2], "gloo", *args[3:])
        if len(args) >= 4:
            args = args[:3]  # pg_options: NCCL's
        return orig_new_group(*args, **_gloo(kwargs))

    def new_subgroups_by_enumeration(*args: Any, **kwargs: Any) -> Any:
        if len(args) >= 2 and args[1] is not None and "nccl" in str(args[1]).lower():
            args = (args[0], "gloo", *args[2:])
        return orig_subgroups(*args, **_gloo(kwargs))

    def barrier(*args: Any, **kwargs: Any) -> Any:
        kwargs.pop("device_ids", None)
        return orig_barrier(*args, **kwargs)

    return {"init_process_group": init_process_group, "new_group": new_group,
            "new_subgroups_by_enumeration": new_subgroups_by_enumeration, "barrier": barrier}


def _identity_pin_memory(data: Any, device: Any = None) -> Any:
    return data


def _cpu_default_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def _megatron_get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    state = torch.default_generator.get_state()
    return state.clone() if clone else state


def _megatron_set_rng_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
    torch.default_generator.set_state(new_state)


def _sp_torch_norm(orig_new: Any) -> Any:
    """Megatron's torch norm (local layer spec) under sequence parallelism, as TE's norms do it.

    megatron-core asserts ``not config.sequence_parallel`` for its torch norms: the norm itself is
    per-token (the same on a sequence shard), but its weight gradients are then partial per TP rank
    and must be summed over the TP group.  TE's norms mark their parameters ``sequence_parallel``
    for that (``finalize_model_grads`` all-reduces such gradients); this builds the torch norm and
    marks its parameters the same way.
    """
    import copy

    fn = orig_new.__func__ if isinstance(orig_new, staticmethod) else orig_new

    def wrapped_torch_norm_new(cls: Any, config: Any, hidden_size: int, eps: float = 1e-5, *args: Any, **kwargs: Any) -> Any:
        if not getattr(config, "sequence_parallel", False):
            return fn(cls, config, hidden_size, eps, *args, **kwargs)
        c = copy.copy(config)
        object.__setattr__(c, "sequence_parallel", False)
        norm = fn(cls, c, hidden_size, eps, *args, **kwargs)
        for p in norm.parameters():
            p.sequence_parallel = True
        return norm

    return wrapped_torch_norm_new


def _zero_state_before_loading(orig: Any) -> Any:
    """megatron-core 0.19.2, distributed optimizer on torch's Adam (no TE/Apex): loading asserts.

    ``sharded_state_dict(is_loading=True)`` calls ``state_dict()``, which asserts exactly one Adam
    step among the per-parameter states (``distrib_optimizer.py:839``) — but before the first step
    the states are empty.  Create Adam's own zero state (``step``, ``exp_avg``, ``exp_avg_sq``, one
    ``step`` tensor per parameter, as ``torch.optim.Adam`` does) first; the load overwrites it.
    """

    def sharded_state_dict(self: Any, *args: Any, **kwargs: Any) -> Any:
        is_loading = kwargs.get("is_loading", args[1] if len(args) > 1 else False)
        if is_loading and len(self.optimizer.state) == 0:
            for group in self.optimizer.param_groups:
                for p in group["params"]:
                    self.optimizer.state[p] = {"step": torch.tensor(0.0, dtype=torch.float32),
                                               "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                               "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
        return orig(self, *args, **kwargs)

    return sharded_state_dict


def _own_step_per_param(orig: Any) -> Any:
    """megatron-core 0.19.2, distributed optimizer on torch's Adam: a resumed run takes wrong Adam steps.

    ``load_state_dict`` gives every parameter the *same* step tensor (``distrib_optimizer.py:1025-1029``)
    and the parameter-state load then copies the pre-load step into it (``:1954``): after a resume
    Adam's bias correction sees step 0, and torch's Adam increments the shared tensor once per
    parameter.  After loading, each parameter gets its own step tensor holding the checkpoint's step
    (the param groups' ``step``).
    """

    def load_state_dict(self: Any, state_dict: Any) -> Any:
        out = orig(self, state_dict)
        steps = {g.get("step") for g in state_dict["optimizer"]["param_groups"] if g.get("step") is not None}
        if len(steps) == 1:
            step = float(next(iter(steps)))
            for st in self.optimizer.state.values():
                if "step" in st:
                    st["step"] = torch.tensor(step, dtype=torch.float32)
        return out

    return load_state_dict


def _no_compile_helpers() -> None:
    return None


def _no_warmup_jit_function(model_config: Any, micro_batch_size: int) -> None:
    return None


_LOCK = threading.Lock()


@contextlib.contextmanager
def cuda_on_cpu() -> Iterator[None]:
    """Redirect CUDA to the CPU and NCCL to gloo inside the block (see the module doc); restore everything on exit.

    Not re-entrant (one rehearsal process runs one block).  Megatron-core and Bridge modules are
    patched only if importable (a plain torch program can use the shim too).
    """
    import torch.distributed as dist
    import torch.utils.data._utils.pin_memory as pin_mod

    if not _LOCK.acquire(blocking=False):
        raise RuntimeError("cuda_on_cpu() is already active in this process (not re-entrant)")
    saved: list[tuple[Any, str, Any, bool]] = []

    def patch(obj: Any, name: str, value: Any) -> None:
        had = hasattr(obj, name)
        old = obj.__dict__.get(name, None) if isinstance(obj, type) else getattr(obj, name, None)
        saved.append((obj, name, old, had))
        setattr(obj, name, value)

    mode = CudaToCpuMode()
    try:
        stubs = _make_stubs()
        for name, fn in stubs.items():
            patch(torch.cuda, name, fn)
        for name in ("manual_seed", "manual_seed_all", "seed", "seed_all", "initial_seed", "get_rng_state",
                     "get_rng_state_all", "set_rng_state", "set_rng_state_all"):
            patch(torch.cuda.random, name, stubs[name])
        patch(torch.cuda, "Stream", _Stream)
        patch(torch.cuda, "Event", _Event)
        for name, fn in _make_nvtx_stubs().items():
            patch(torch.cuda.nvtx, name, fn)
        for name, fn in _make_accelerator_stubs().items():
            patch(torch.accelerator, name, fn)
        for name, fn in _make_dist_wrappers(dist).items():
            patch(dist, name, fn)
        patch(pin_mod, "pin_memory", _identity_pin_memory)
        _patch_megatron(patch)
        mode.__enter__()
        try:
            yield
        finally:
            mode.__exit__(None, None, None)
    finally:
        for obj, name, value, had in reversed(saved):
            if had:
                setattr(obj, name, value)
            else:
                delattr(obj, name)
        _LOCK.release()


def _patch_megatron(patch: Any) -> None:
    try:
        from megatron.core.fusions import fused_softmax
        from megatron.core.tensor_parallel import random as mrandom
    except ImportError:
        return
    patch(mrandom, "_get_cuda_rng_state", _megatron_get_rng_state)
    patch(mrandom, "_set_cuda_rng_state", _megatron_set_rng_state)
    patch(fused_softmax, "get_default_causal_mask", _cpu_default_causal_mask)
    try:
        from megatron.core.transformer import torch_norm
    except ImportError:
        torch_norm = None
    if torch_norm is not None:
        patch(torch_norm.WrappedTorchNorm, "__new__", staticmethod(_sp_torch_norm(torch_norm.WrappedTorchNorm.__dict__["__new__"])))
    try:
        from megatron.core.datasets import utils as dutils

        patch(dutils, "compile_helpers", _no_compile_helpers)
    except ImportError:
        pass
    try:
        from megatron.core.optimizer import distrib_optimizer as dopt
    except ImportError:
        dopt = None
    if dopt is not None and not dopt.HAVE_APEX_OR_TE:
        cls = dopt.DistributedOptimizer
        patch(cls, "sharded_state_dict", _zero_state_before_loading(cls.__dict__["sharded_state_dict"]))
        patch(cls, "load_state_dict", _own_step_per_param(cls.__dict__["load_state_dict"]))
    try:
        from megatron.bridge.training import initialize as binit
    except ImportError:
        return
    patch(binit, "compile_helpers", _no_compile_helpers)
    patch(binit, "_warmup_jit_function", _no_warmup_jit_function)
