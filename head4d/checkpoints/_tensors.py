"""Tensors of a network pickle: torch's legacy storage blobs and the tensor rebuild calls.

A tensor in a plain pickle (``pickle.dump`` of a module, as StyleGAN-family training
loops write their snapshots) is a call of ``torch._utils._rebuild_tensor_v2(storage,
storage_offset, size, stride, requires_grad, backward_hooks[, metadata])``; a parameter
wraps that in ``torch._utils._rebuild_parameter(data, requires_grad, backward_hooks)``.
The storage is ``torch.storage._load_from_bytes(blob)``, where the blob is a legacy
(non-zip) ``torch.save`` of that one storage. Its layout (written the same way from
torch 1.x through 2.x):

1. three small pickles: the magic number 0x1950a86a20f9469cfc6c, the format version
   1001, and a dict describing the writer (``little_endian`` among others);
2. a pickle whose root is a persistent id ``('storage', torch.<T>Storage, key,
   location, numel, view_metadata)``; T names the element type (Float, Half, Long,
   ...), newer torch writes ``torch.storage.UntypedStorage`` (bytes) for the dtypes
   that have no typed storage class and passes the dtype to ``_rebuild_tensor_v3``;
3. a pickle of the list of storage keys;
4. per key: its element count as a little-endian int64, then the raw little-endian data.

Here the blob is parsed as data: its pickles may only name storage classes, and its
bytes become a fresh CPU storage (whatever location it names). Tensors are rebuilt as
views of that storage after a bounds check; backward hooks and metadata are dropped.
"""
from __future__ import annotations

import io
import pickle
import struct
import sys
from typing import Any, Dict, Tuple

import torch

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001

# torch's storage class names (module `torch`) and the element type each one holds.
STORAGE_DTYPES: Dict[str, torch.dtype] = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "ComplexDoubleStorage": torch.complex128,
    "ComplexFloatStorage": torch.complex64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class StorageClass:
    """Stand-in for a torch storage class named by a pickle (never the class itself: not callable)."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: torch.dtype):
        self.name = name
        self.dtype = dtype

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError(f"a pickle may not set the state of the global {self.name}")

    def __repr__(self) -> str:
        return f"StorageClass({self.name})"


def storage_class_globals() -> Dict[Tuple[str, str], StorageClass]:
    """The (module, name) pairs of the storage classes a blob or a pickle may name."""
    table = {("torch", name): StorageClass(f"torch.{name}", dtype) for name, dtype in STORAGE_DTYPES.items()}
    table[("torch.storage", "UntypedStorage")] = StorageClass("torch.storage.UntypedStorage", torch.uint8)
    table[("torch", "UntypedStorage")] = StorageClass("torch.UntypedStorage", torch.uint8)
    return table


class LoadedStorage:
    """A storage read from a legacy blob: ``dtype`` and a CPU ``torch.UntypedStorage`` of its bytes."""

    __slots__ = ("dtype", "untyped", "typed")

    def __init__(self, dtype: torch.dtype, untyped: torch.UntypedStorage, typed: bool):
        self.dtype = dtype
        self.untyped = untyped
        self.typed = typed  # False for an UntypedStorage (bytes; the tensor call gives the dtype)

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError("a pickle may not set the state of a storage")

    def numel(self, dtype: torch.dtype) -> int:
        return self.untyped.nbytes() // _element_size(dtype)


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class _DataOnlyUnpickler(pickle.Unpickler):
    """Reads a pickle of plain data (numbers, strings, lists, dicts): no global is allowed."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"a storage blob may not name the global {module}.{name}")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("unexpected persistent id in a storage blob's header")


class _StorageRootUnpickler(_DataOnlyUnpickler):
    """Reads a blob's root pickle: a persistent id naming one storage; only storage classes are allowed."""

    _storage_classes = storage_class_globals()

    def __init__(self, stream):
        super().__init__(stream)
        self.storages: Dict[str, Tuple[StorageClass, int]] = {}

    def find_class(self, module: str, name: str):
        storage_class = self._storage_classes.get((module, name))
        if storage_class is None:
            raise pickle.UnpicklingError(f"a storage blob may only name torch storage classes, not {module}.{name}")
        return storage_class

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id in a storage blob: {pid!r:.200}")
        _, storage_class, key, location, numel, view_metadata = pid
        if not isinstance(storage_class, StorageClass) or not isinstance(key, str) or not _is_int(numel) or numel < 0:
            raise pickle.UnpicklingError(f"malformed storage id in a storage blob: {pid!r:.200}")
        if view_metadata is not None:
            raise pickle.UnpicklingError("storage views (an old torch.save format) are not supported")
        self.storages[key] = (storage_class, numel)
        return key


def load_storage_blob(blob: Any) -> LoadedStorage:
    """Parse one legacy ``torch.save`` blob of a storage (``torch.storage._load_from_bytes``' argument)."""
    if not isinstance(blob, (bytes, bytearray)):
        raise pickle.UnpicklingError(f"_load_from_bytes expects bytes, got {type(blob).__name__}")
    try:
        return _parse_storage_blob(io.BytesIO(blob))
    except EOFError:
        raise pickle.UnpicklingError("storage blob truncated") from None
    except (TypeError, ValueError, AttributeError, KeyError) as error:
        raise pickle.UnpicklingError(f"malformed storage blob: {error}") from None


def _parse_storage_blob(stream: io.BytesIO) -> LoadedStorage:
    magic = _DataOnlyUnpickler(stream).load()
    version = _DataOnlyUnpickler(stream).load()
    if magic != LEGACY_MAGIC_NUMBER or version != LEGACY_PROTOCOL_VERSION:
        raise pickle.UnpicklingError("not a legacy torch.save blob (wrong magic number or format version)")
    sys_info = _DataOnlyUnpickler(stream).load()
    if not isinstance(sys_info, dict):
        raise pickle.UnpicklingError("a storage blob's header must describe its writer in a dict")
    if sys_info.get("little_endian") is not True:
        raise pickle.UnpicklingError("storage blob written on a big-endian machine: not supported")
    if sys.byteorder != "little":
        raise pickle.UnpicklingError("reading torch storages needs a little-endian machine")
    root = _StorageRootUnpickler(stream)
    root_key = root.load()
    if not isinstance(root_key, str) or root_key not in root.storages:
        raise pickle.UnpicklingError("a storage blob's root must be its storage")
    keys = _DataOnlyUnpickler(stream).load()
    if (not isinstance(keys, list) or not all(isinstance(key, str) for key in keys)
            or len(set(keys)) != len(keys) or set(keys) != set(root.storages)):
        raise pickle.UnpicklingError("a storage blob's key list does not match its storages")
    loaded: Dict[str, LoadedStorage] = {}
    for key in keys:
        storage_class, numel = root.storages[key]
        header = stream.read(8)
        if len(header) != 8:
            raise pickle.UnpicklingError(f"storage blob truncated before the size of storage {key}")
        (count,) = struct.unpack("<q", header)
        if count != numel:
            raise pickle.UnpicklingError(f"storage {key} holds {count} elements where its id says {numel}")
        nbytes = count * _element_size(storage_class.dtype)
        data = stream.read(nbytes)
        if len(data) != nbytes:
            raise pickle.UnpicklingError(f"storage blob truncated: storage {key} needs {nbytes} bytes, has {len(data)}")
        untyped = torch.UntypedStorage.from_buffer(data, dtype=torch.uint8) if nbytes else torch.UntypedStorage(0)
        typed = not storage_class.name.endswith("UntypedStorage")
        loaded[key] = LoadedStorage(storage_class.dtype, untyped, typed)
    return loaded[root_key]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _checked_shape(what: str, values: Any) -> Tuple[int, ...]:
    if not isinstance(values, (tuple, list, torch.Size)) or not all(_is_int(v) and v >= 0 for v in values):
        raise pickle.UnpicklingError(f"tensor {what} must be a tuple of non-negative ints, got {values!r:.200}")
    return tuple(values)


def rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
    """A tensor viewing `storage` (a `LoadedStorage`), after checking that the view stays inside it."""
    if not isinstance(storage, LoadedStorage):
        raise pickle.UnpicklingError(f"a tensor must be rebuilt from a storage blob, got {type(storage).__name__}")
    if dtype is None:
        if not storage.typed:
            raise pickle.UnpicklingError("a tensor on an untyped storage needs its dtype (_rebuild_tensor_v3)")
        dtype = storage.dtype
    elif not isinstance(dtype, torch.dtype):
        raise pickle.UnpicklingError(f"tensor dtype must be a torch dtype, got {dtype!r:.200}")
    size = _checked_shape("size", size)
    stride = _checked_shape("stride", stride)
    if len(size) != len(stride) or not _is_int(storage_offset) or storage_offset < 0:
        raise pickle.UnpicklingError(f"inconsistent tensor view: offset {storage_offset!r:.50}, size {size}, "
                                     f"stride {stride}")
    extent = 0 if 0 in size else storage_offset + 1 + sum((n - 1) * s for n, s in zip(size, stride))
    available = storage.numel(dtype)
    if extent > available:
        raise pickle.UnpicklingError(f"tensor view (offset {storage_offset}, size {size}, stride {stride}) "
                                     f"reaches element {extent} of a storage of {available}")
    return torch.empty((0,), dtype=dtype).set_(storage.untyped, storage_offset, size, stride)


def _set_requires_grad(tensor: torch.Tensor, requires_grad: Any) -> torch.Tensor:
    if not isinstance(requires_grad, bool):
        raise pickle.UnpicklingError(f"requires_grad must be a bool, got {requires_grad!r:.50}")
    if requires_grad:
        tensor.requires_grad_(True)
    return tensor


# The torch rebuild functions a network pickle calls, with torch's argument lists. Hooks
# and metadata are accepted and dropped (modules are pickled after requires_grad_(False),
# and hooks are never serialized).
def rebuild_tensor_v1(storage, storage_offset, size, stride):
    return rebuild_tensor(storage, storage_offset, size, stride)


def rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    return _set_requires_grad(rebuild_tensor(storage, storage_offset, size, stride), requires_grad)


def rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    return _set_requires_grad(rebuild_tensor(storage, storage_offset, size, stride, dtype), requires_grad)


def rebuild_parameter(data, requires_grad, backward_hooks):
    if not isinstance(data, torch.Tensor) or not isinstance(requires_grad, bool):
        raise pickle.UnpicklingError("_rebuild_parameter expects a tensor and a bool")
    return torch.nn.Parameter(data, requires_grad)


def rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    """As `rebuild_parameter`; Python attributes recorded on the parameter are dropped."""
    return rebuild_parameter(data, requires_grad, backward_hooks)


class TensorClass:
    """Stand-in for ``torch.Tensor`` / ``torch.nn.Parameter`` named by a pickle (not callable)."""

    __slots__ = ("name", "is_parameter")

    def __init__(self, name: str, is_parameter: bool):
        self.name = name
        self.is_parameter = is_parameter

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError(f"a pickle may not set the state of the global {self.name}")


def rebuild_from_type_v2(func, new_type, args, state):
    """``torch._tensor._rebuild_from_type_v2``: a tensor with Python state; the state is dropped."""
    if not isinstance(new_type, TensorClass) or not isinstance(args, tuple):
        raise pickle.UnpicklingError("_rebuild_from_type_v2 may only rebuild torch.Tensor or torch.nn.Parameter")
    tensor = func(*args)
    if not isinstance(tensor, torch.Tensor):
        raise pickle.UnpicklingError("_rebuild_from_type_v2: the rebuild function did not give a tensor")
    if new_type.is_parameter and not isinstance(tensor, torch.nn.Parameter):
        tensor = torch.nn.Parameter(tensor, tensor.requires_grad)
    return tensor


__all__ = ["LoadedStorage", "StorageClass", "TensorClass", "load_storage_blob",
           "rebuild_from_type_v2", "rebuild_parameter", "rebuild_parameter_with_state", "rebuild_tensor_v1",
           "rebuild_tensor_v2", "rebuild_tensor_v3", "storage_class_globals"]
