"""Tensors that behave as CUDA tensors do, on a machine without a GPU.

``FakeCuda`` is a ``torch.overrides.TorchFunctionMode``. A tensor is "on the GPU" when it carries a
mark: the parameters and buffers of a model ``put_on_fake_cuda`` marked, and every tensor an
operation makes from a marked one, or that a factory (``torch.zeros(..., device="cuda")``) or
``.to("cuda")`` / ``.cuda()`` makes. The data stay on the CPU (the arithmetic is the CPU's), but
what a real GPU refuses is refused here, with CUDA's own messages:

- ``.numpy()`` and ``np.asarray(t)`` (``__array__``) of a marked tensor raise ``TypeError`` until the
  tensor is moved with ``.cpu()`` / ``.to("cpu")``; ``.tolist()``, ``.item()`` and ``float(t)`` work,
  as on CUDA;
- an operation that mixes a marked tensor with an unmarked one of one or more dimensions raises
  ``RuntimeError`` ("Expected all tensors to be on the same device"), as CUDA does (a CPU scalar
  tensor is allowed, and CPU index tensors may index a CUDA tensor, as in torch);
- ``t.device`` of a marked tensor is ``cuda:0`` and ``t.is_cuda`` is true, so code that makes new
  tensors "on the same device" marks them, and ``torch.cuda.get_device_properties`` answers for it.

Use in a test::

    with FakeCuda() as fake:
        fake.put_on_fake_cuda(model)     # a LoadedModel or a diffusers pipeline
        ...

and in a notebook kernel: ``install()`` (``tests/fake_cuda_site/sitecustomize.py`` calls it when
``ISEG_FAKE_CUDA=1``) enters the mode for good and marks every model ``iseg.load_model`` returns.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

__all__ = ["FakeCuda", "install", "is_fake_cuda", "NUMPY_ERROR"]

_MARK = "_iseg_fake_cuda"
CUDA = torch.device("cuda", 0)
NUMPY_ERROR = "can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor to host memory first."
MIXED_ERROR = ("Expected all tensors to be on the same device, but found at least two devices, cuda:0 and cpu! "
               "(fake CUDA: {name})")

# torch lets these take tensors of another device (copies, CPU index tensors, device moves)
_CROSS_DEVICE = {"copy_", "__getitem__", "__setitem__", "index_put_", "index_put", "to", "cpu", "cuda",
                 "type", "__get__", "__set__", "set_", "_has_compatible_shallow_copy_type", "__repr__",
                 "__format__", "__str__", "detach", "requires_grad_", "__reduce_ex__", "__deepcopy__", "data_ptr",
                 "untyped_storage", "storage", "_typed_storage", "is_pinned", "__len__", "numel", "dim", "size"}


def is_fake_cuda(t) -> bool:
    return isinstance(t, torch.Tensor) and getattr(t, _MARK, False)


def _mark(t):
    if isinstance(t, torch.Tensor):
        try:
            setattr(t, _MARK, True)
        except (AttributeError, RuntimeError):
            pass
    return t


def _alias(t, cuda: bool):
    """A new tensor object for ``t`` (same storage), marked or not: ``.to`` may return ``t`` itself."""
    new = t.view_as(t) if isinstance(t, torch.Tensor) else t
    if cuda:
        _mark(new)
    return new


def _is_cuda_device(device) -> bool:
    if device is None:
        return False
    if isinstance(device, int):
        return True  # an index means a CUDA device in torch
    try:
        return torch.device(device).type == "cuda"
    except (RuntimeError, TypeError):
        return False


def _target_device(args, kwargs):
    """The device that a ``.to(...)`` call names, or ``None`` for a dtype-only call."""
    if "device" in kwargs:
        return kwargs["device"]
    for a in args[1:]:
        if isinstance(a, (str, torch.device)):
            return a
        if isinstance(a, torch.Tensor):
            return CUDA if is_fake_cuda(a) else a.device
    return None


def _to_cpu_device(args, kwargs):
    args = tuple("cpu" if isinstance(a, (str, torch.device)) and _is_cuda_device(a) else a for a in args)
    kwargs = dict(kwargs)
    if "device" in kwargs and _is_cuda_device(kwargs["device"]):
        kwargs["device"] = "cpu"
    return args, kwargs


class _Properties:
    def __init__(self):
        self.name = "Fake CUDA device (CPU arithmetic)"
        self.total_memory = 16 * 2**30
        self.major, self.minor = 8, 0
        self.multi_processor_count = 1


class FakeCuda(TorchFunctionMode):
    """Marked tensors refuse numpy and mixing with CPU tensors, as CUDA tensors do (see the module)."""

    def __init__(self):
        super().__init__()
        self._patched = {}

    # -- the fake device's facts ---------------------------------------------------------------
    def __enter__(self):
        cuda = torch.cuda
        self._patched = {name: getattr(cuda, name) for name in
                         ("get_device_properties", "synchronize", "empty_cache", "get_device_name",
                          "max_memory_allocated", "reset_peak_memory_stats", "device_count")}
        cuda.get_device_properties = lambda device=None: _Properties()
        cuda.get_device_name = lambda device=None: _Properties().name
        cuda.synchronize = lambda device=None: None
        cuda.empty_cache = lambda: None
        cuda.max_memory_allocated = lambda device=None: 0
        cuda.reset_peak_memory_stats = lambda device=None: None
        cuda.device_count = lambda: 1
        return super().__enter__()

    def __exit__(self, *exc):
        for name, fn in self._patched.items():
            setattr(torch.cuda, name, fn)
        return super().__exit__(*exc)

    @staticmethod
    def put_on_fake_cuda(model):
        """Mark every parameter and buffer of a model (a ``LoadedModel``, a pipeline or a module)."""
        pipe = getattr(model, "pipe", model)
        modules = [pipe] if isinstance(pipe, torch.nn.Module) else [
            m for m in getattr(pipe, "components", {}).values() if isinstance(m, torch.nn.Module)]
        for module in modules:
            for t in list(module.parameters()) + list(module.buffers()):
                _mark(t)
        return model

    # -- every torch call ----------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "__get__":
            attribute = getattr(getattr(func, "__self__", None), "__name__", "")
            if args and is_fake_cuda(args[0]):
                if attribute == "device":
                    return CUDA
                if attribute == "is_cuda":
                    return True
                if attribute == "is_cpu":
                    return False
                out = func(*args, **kwargs)
                return _mark(out) if isinstance(out, torch.Tensor) else out  # .data, .T, .grad, ...
            return func(*args, **kwargs)
        if name in ("numpy", "__array__") and args and is_fake_cuda(args[0]):
            raise TypeError(NUMPY_ERROR)
        if name == "cpu":
            return _alias(func(*args, **kwargs), cuda=False)
        if name == "cuda":
            return _alias(args[0], cuda=True)
        if name == "to":
            target = _target_device(args, kwargs)
            if target is None:
                out = func(*args, **kwargs)
                return _alias(out, cuda=is_fake_cuda(args[0])) if out is args[0] else (
                    _mark(out) if is_fake_cuda(args[0]) else out)
            cuda = _is_cuda_device(target)
            args, kwargs = _to_cpu_device(args, kwargs)
            return _alias(func(*args, **kwargs), cuda=cuda)

        # factories and ``new_*``: a CUDA device argument makes a marked CPU tensor
        factory_cuda = _is_cuda_device(kwargs.get("device"))
        if factory_cuda:
            args, kwargs = _to_cpu_device(args, kwargs)
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        marked = [t for t in tensors if is_fake_cuda(t)]
        if marked and name not in _CROSS_DEVICE:
            plain = [t for t in tensors if not is_fake_cuda(t) and t.dim() > 0]
            if plain:
                raise RuntimeError(MIXED_ERROR.format(name=name))
        out = func(*args, **kwargs)
        if factory_cuda or (marked and name not in ("__setitem__", "copy_")):
            tree_map(_mark, out)
        elif marked and name == "copy_":
            pass  # a copy into a CPU tensor stays on the CPU
        return out


_INSTALLED: FakeCuda | None = None


def install() -> FakeCuda:
    """Mark every model ``iseg.load_model`` returns as if it had been moved to a GPU, and enter
    ``FakeCuda`` for the rest of the process when the first one is loaded (a notebook kernel
    started with ISEG_FAKE_CUDA=1). Before a model exists no tensor is on the fake GPU, so imports
    and the loading itself run without the mode's cost (a third of a notebook's time otherwise)."""
    global _INSTALLED
    if _INSTALLED is not None:
        return _INSTALLED
    import iseg.loading as loading

    finish = loading._finish
    mode = _INSTALLED = FakeCuda()
    entered = []

    def finish_on_fake_cuda(pipe, device, name, *args, **kwargs):
        model = FakeCuda.put_on_fake_cuda(finish(pipe, device, name, *args, **kwargs))
        if not entered:
            mode.__enter__()
            entered.append(True)
        return model

    loading._finish = finish_on_fake_cuda
    return mode
