"""The restricted unpickler behind `read_pickle`.

A pickle names each global it needs (module + name) and the unpickler's
``find_class`` resolves it. Here the resolution is a fixed table, and nothing a
pickle names is ever imported:

1. **Allow-listed globals are real** (or a stand-in with the same behaviour): torch's
   tensor / parameter / storage rebuild functions (`_tensors`), torch's storage classes,
   dtypes, layouts and memory formats, ``torch.Size`` and ``torch.device``,
   ``collections.OrderedDict``, the builtin data types (set, frozenset, dict, list,
   tuple, slice, complex, range; bytearray and
   ``_codecs.encode`` only to turn text into bytes), numpy's array reconstruction
   (``_reconstruct`` with ``ndarray`` only, ``_frombuffer``), ``numpy.dtype`` and
   numpy scalars (``numpy.core`` and numpy 2's ``numpy._core`` names), copyreg's
   ``_reconstructor`` / ``__newobj__`` (only for the classes of rule 3 and dicts),
   ``dnnlib.util.EasyDict`` (our `EasyDict`), and
   ``torch_utils.persistence._reconstruct_persistent_obj``, which becomes the builder
   of a `PersistentRecord` (its ``module_src`` is kept as text, never executed).
2. **Refused**: any global of a module that can run code or reach the system
   (builtins other than the data types, os / posix / nt, subprocess, sys, importlib,
   shutil, socket, pickle, marshal, types, functools, operator, runpy, code, pty,
   ctypes, io, ... see `DENIED_MODULES`) and any name with a dunder part (attribute
   chains such as ``load.__globals__``). `UnsafePickleError` names the global.
3. **Every other global becomes a placeholder class**, never imported. Creating an
   object of it the way pickle creates objects of classes (NEWOBJ / NEWOBJ_EX, OBJ or
   INST without arguments, copyreg's reconstructor) gives an inert `ObjectRecord`,
   and BUILD stores the pickled state in it: that is how torch.nn layers, upstream
   helper classes and rasterizer settings come back. *Calling* a placeholder (REDUCE,
   or INST / OBJ with arguments) is refused with `UnsafePickleError` naming it: an
   unknown name may be a function, and the only calls a network pickle needs are
   those of rule 1. Placeholders cannot be modified by the pickle (BUILD on them fails).

BUILD (pickle's "set the state of the object on the stack") is allowed only on records,
numpy arrays and dtypes, EasyDicts and OrderedDicts: never on a tensor (torch's legacy
``Tensor.__setstate__`` would re-point it at another storage or install backward hooks)
nor on a global. Allow-listed functions are also wrapped in objects whose state cannot
be set, and the classes a pickle may reach cannot be modified, so one read cannot alter
the next. This is why the unpickler is Python's own implementation (``pickle._Unpickler``,
whose opcodes can be overridden; reading costs about the same as the C one, the time
going into copying tensor data). Persistent ids (``torch.save`` archives) are refused
at the top level; storage blobs are parsed as data (`_tensors`).
"""
from __future__ import annotations

import _compat_pickle
import codecs
import collections
import io
import os
import pickle
from typing import Any, BinaryIO, Callable, Dict, Tuple, Union

import numpy as np
import torch

from . import _tensors
from ._records import ObjectRecord, PersistentRecord

# Modules whose globals are refused outright (the first dotted part of the module name).
DENIED_MODULES = frozenset({
    "builtins", "__builtin__", "os", "posix", "nt", "posixpath", "ntpath", "subprocess", "sys", "importlib",
    "shutil", "socket", "pickle", "_pickle", "marshal", "types", "functools", "_functools", "operator",
    "_operator", "runpy", "code", "codeop", "pty", "ctypes", "_ctypes", "io", "_io", "pathlib", "tempfile",
    "multiprocessing", "_posixsubprocess", "threading", "_thread", "signal", "asyncio", "pdb", "bdb", "inspect",
    "gc", "copy", "copyreg", "copy_reg", "ast", "platform", "select", "ssl", "http", "urllib", "webbrowser",
    "zipimport", "pkgutil", "site", "sysconfig", "distutils", "setuptools", "glob", "fcntl", "mmap", "pydoc",
    "timeit", "trace", "cProfile", "profile", "zipfile", "tarfile", "logging", "ensurepip", "venv", "atexit",
    "weakref", "_weakref", "_codecs", "codecs", "linecache", "compileall", "py_compile", "tkinter", "ftplib",
    "smtplib", "telnetlib", "xmlrpc", "imp",
})

PERSISTENT_RECONSTRUCT = ("torch_utils.persistence", "_reconstruct_persistent_obj")


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for a global that `read_pickle` refuses; ``global_name`` is ``module.name``."""

    def __init__(self, global_name: str, reason: str):
        super().__init__(f"read_pickle refused the global {global_name!r}: {reason}")
        self.global_name = global_name


class _FrozenClass(type):
    """Metaclass of the classes a pickle may reach: their attributes cannot be set (BUILD on a class)."""

    def __setattr__(cls, name: str, value: Any) -> None:
        raise pickle.UnpicklingError(f"a pickle may not set attribute {name!r} of the class {cls.__name__}")

    def __delattr__(cls, name: str) -> None:
        raise pickle.UnpicklingError(f"a pickle may not delete attribute {name!r} of the class {cls.__name__}")

    def __setstate__(cls, state: Any) -> None:
        raise pickle.UnpicklingError(f"a pickle may not set the state of the class {cls.__name__}")


class EasyDict(dict, metaclass=_FrozenClass):
    """A dict whose items are also attributes: the stand-in for ``dnnlib.util.EasyDict``."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        del self[name]


class _PlaceholderClass(_FrozenClass):
    """Metaclass of placeholders: calling one (REDUCE) is refused; pickle's NEWOBJ uses ``__new__``."""

    def __call__(cls, *args, **kwargs):
        raise UnsafePickleError(cls._global_name, "it is not allow-listed, so a pickle may not call it; an "
                                "unknown class is read only as a record of an object created without a call "
                                "(NEWOBJ, copyreg's reconstructor)")


class _Placeholder(metaclass=_PlaceholderClass):
    """Base of the placeholder classes; what ``__new__`` makes is a plain `ObjectRecord`."""

    _global_module = ""
    _global_class = ""
    _global_name = ""

    def __new__(cls, *args, **kwargs):
        return ObjectRecord(cls._global_module, cls._global_class, args, kwargs)


def _placeholder_class(module: str, name: str) -> type:
    return _PlaceholderClass(name.rsplit(".", 1)[-1], (_Placeholder,), {
        "_global_module": module, "_global_class": name, "_global_name": f"{module}.{name}",
        "__module__": __name__, "__qualname__": f"placeholder[{module}.{name}]",
    })


class _AllowedFunction:
    """An allow-listed function as a pickle sees it: callable, and its state cannot be set."""

    __slots__ = ("_name", "_function")

    def __init__(self, name: str, function: Callable):
        self._name = name
        self._function = function

    def __call__(self, *args, **kwargs):
        return self._function(*args, **kwargs)

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError(f"a pickle may not set the state of the global {self._name}")

    def __repr__(self) -> str:
        return f"<allow-listed {self._name}>"


class _ObjectBase:
    """``builtins.object``, allowed only as the base argument of copyreg's reconstructor."""

    __slots__ = ()

    def __call__(self, *args, **kwargs):
        raise UnsafePickleError("builtins.object", "a pickle may use it only as copyreg._reconstructor's base")

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError("a pickle may not set the state of builtins.object")


_OBJECT_BASE = _ObjectBase()


def _is_record_class(cls: Any) -> bool:
    return isinstance(cls, _PlaceholderClass)


def _copyreg_reconstructor(cls, base, state):
    """copyreg._reconstructor(cls, base, state) for placeholders (base object) and dict types."""
    if _is_record_class(cls) and base is _OBJECT_BASE and state is None:
        return cls.__new__(cls)
    if cls in (EasyDict, collections.OrderedDict) and base is dict:
        return cls(state or {})
    raise pickle.UnpicklingError("copyreg._reconstructor is allowed only for unknown classes over object "
                                 "(they become records) and for EasyDict / OrderedDict over dict")


def _copyreg_newobj(cls, *args):
    """copyreg.__newobj__(cls, *args) for placeholders and dict types."""
    if _is_record_class(cls) or cls in (EasyDict, collections.OrderedDict):
        return cls.__new__(cls, *args)
    raise pickle.UnpicklingError("copyreg.__newobj__ is allowed only for unknown classes (records), EasyDict "
                                 "and OrderedDict")


def _build_persistent_record(meta: Any) -> PersistentRecord:
    """Stands in for persistence's reconstruct function: keep class name, source text and state."""
    if not isinstance(meta, dict):
        raise pickle.UnpicklingError(f"persistent object: meta must be a dict, got {type(meta).__name__}")
    if meta.get("type") != "class":
        raise pickle.UnpicklingError(f"persistent object: unsupported type {meta.get('type')!r:.50} (expected 'class')")
    class_name, module_src, state = meta.get("class_name"), meta.get("module_src"), meta.get("state")
    if not isinstance(class_name, str):
        raise pickle.UnpicklingError("persistent object: meta['class_name'] must be a str")
    if module_src is not None and not isinstance(module_src, str):
        raise pickle.UnpicklingError("persistent object: meta['module_src'] must be source text")
    if state is None:
        state = {}
    if not isinstance(state, dict):
        raise pickle.UnpicklingError(f"persistent object {class_name}: state must be a dict, "
                                     f"got {type(state).__name__}")
    return PersistentRecord(class_name, module_src, meta.get("version"), dict(state))


def _numpy_function(name: str) -> Callable:
    """A numpy reconstruction function from wherever this numpy keeps it (numpy 2: numpy._core)."""
    for module_name in ("numpy._core.multiarray", "numpy._core.numeric", "numpy.core.multiarray", "numpy.core.numeric"):
        try:
            module = __import__(module_name, fromlist=[name])
        except ImportError:
            continue
        if hasattr(module, name):
            return getattr(module, name)
    raise ImportError(f"numpy has no {name}")


def _numpy_reconstruct(subtype, shape, dtype):
    """numpy's ``_reconstruct`` for plain ndarrays only (the array's data comes with BUILD)."""
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError(f"numpy _reconstruct is allowed only for numpy.ndarray, got {subtype!r:.100}")
    return _numpy_function("_reconstruct")(subtype, shape, dtype)


def _numpy_scalar(dtype, *data):
    if not isinstance(dtype, np.dtype):
        raise pickle.UnpicklingError("numpy scalar: the first argument must be a numpy dtype")
    return _numpy_function("scalar")(dtype, *data)


def _numpy_frombuffer(buffer, dtype, shape, order):
    """numpy's ``_frombuffer`` (protocol 5 arrays), as a writable copy."""
    if not isinstance(buffer, (bytes, bytearray, memoryview, pickle.PickleBuffer)) or not isinstance(dtype, np.dtype):
        raise pickle.UnpicklingError("numpy _frombuffer expects a bytes buffer and a numpy dtype")
    return np.frombuffer(buffer, dtype=dtype).reshape(shape, order=order).copy(order="K")


def _text_to_bytes(text, encoding="utf-8"):
    """``_codecs.encode(text, 'latin1')``: how protocol 2 pickles write bytes."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "iso-8859-1"):
        raise pickle.UnpicklingError("_codecs.encode is allowed only to turn text into bytes with latin1")
    return codecs.encode(text, "latin1")


def _bytearray(data=b"", encoding=None):
    if isinstance(data, (bytes, bytearray)) and encoding is None:
        return bytearray(data)
    if isinstance(data, str) and encoding in ("latin1", "latin-1", "iso-8859-1"):
        return bytearray(data, "latin1")
    raise pickle.UnpicklingError("builtins.bytearray is allowed only on bytes, or text with latin1")


_TORCH_DTYPE_NAMES = (
    "float32", "float", "float64", "double", "float16", "half", "bfloat16", "complex32", "chalf", "complex64",
    "cfloat", "complex128", "cdouble", "uint8", "uint16", "uint32", "uint64", "int8", "int16", "short", "int32",
    "int", "int64", "long", "bool", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
)
# torch constants a module may keep as attributes (layouts, memory formats).
_TORCH_CONSTANT_NAMES = ("strided", "sparse_coo", "contiguous_format", "channels_last", "channels_last_3d",
                         "preserve_format")


def _allowed_globals() -> Dict[Tuple[str, str], Any]:
    """The table of rule 1: (module, name) -> the object a pickle gets for it."""
    allowed: Dict[Tuple[str, str], Any] = {}

    def function(module: str, name: str, implementation: Callable) -> None:
        allowed[(module, name)] = _AllowedFunction(f"{module}.{name}", implementation)

    function("torch._utils", "_rebuild_tensor", _tensors.rebuild_tensor_v1)
    function("torch._utils", "_rebuild_tensor_v2", _tensors.rebuild_tensor_v2)
    function("torch._utils", "_rebuild_tensor_v3", _tensors.rebuild_tensor_v3)
    function("torch._utils", "_rebuild_parameter", _tensors.rebuild_parameter)
    function("torch._utils", "_rebuild_parameter_with_state", _tensors.rebuild_parameter_with_state)
    function("torch._tensor", "_rebuild_from_type_v2", _tensors.rebuild_from_type_v2)
    function("torch.storage", "_load_from_bytes", _tensors.load_storage_blob)
    allowed[("torch", "Tensor")] = _tensors.TensorClass("torch.Tensor", is_parameter=False)
    allowed[("torch._tensor", "Tensor")] = _tensors.TensorClass("torch._tensor.Tensor", is_parameter=False)
    allowed[("torch.nn.parameter", "Parameter")] = _tensors.TensorClass("torch.nn.parameter.Parameter",
                                                                         is_parameter=True)
    allowed.update(_tensors.storage_class_globals())
    for name in _TORCH_DTYPE_NAMES:
        dtype = getattr(torch, name, None)
        if isinstance(dtype, torch.dtype):
            allowed[("torch", name)] = dtype
    layouts = {}
    for name in _TORCH_CONSTANT_NAMES:
        constant = getattr(torch, name, None)
        if isinstance(constant, (torch.layout, torch.memory_format)):
            allowed[("torch", name)] = constant
        if isinstance(constant, torch.memory_format):  # torch writes these as torch._utils' torch.<name>
            allowed[("torch._utils", f"torch.{name}")] = constant
        if isinstance(constant, torch.layout):
            layouts[f"torch.{name}"] = constant

    def layout_by_name(name):  # how torch pickles a layout: _get_layout('torch.strided')
        if name not in layouts:
            raise pickle.UnpicklingError(f"unknown torch layout {name!r:.100}")
        return layouts[name]

    function("torch.serialization", "_get_layout", layout_by_name)
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch", "device")] = torch.device
    allowed[("collections", "OrderedDict")] = collections.OrderedDict
    for builtin in (set, frozenset, dict, list, tuple, slice, complex, range):
        allowed[("builtins", builtin.__name__)] = builtin
    function("builtins", "bytearray", _bytearray)
    allowed[("builtins", "object")] = _OBJECT_BASE
    function("_codecs", "encode", _text_to_bytes)
    function("copyreg", "_reconstructor", _copyreg_reconstructor)
    function("copyreg", "__newobj__", _copyreg_newobj)
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        function(module, "_reconstruct", _numpy_reconstruct)
        function(module, "scalar", _numpy_scalar)
    for module in ("numpy.core.numeric", "numpy._core.numeric"):
        function(module, "_frombuffer", _numpy_frombuffer)
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    for module in ("dnnlib.util", "dnnlib"):
        allowed[(module, "EasyDict")] = EasyDict
    function(*PERSISTENT_RECONSTRUCT, _build_persistent_record)
    return allowed


_ALLOWED_GLOBALS = _allowed_globals()


def _python3_name(module: str, name: str) -> Tuple[str, str]:
    """Python 3's name of a global that protocols 0-2 wrote under its Python 2 name (``__builtin__``, ``copy_reg``)."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def _may_take_state(obj: Any) -> bool:
    """Whether BUILD may set the state of `obj`: records, numpy arrays and dtypes, dicts of our types."""
    return (isinstance(obj, (ObjectRecord, np.dtype, EasyDict, collections.OrderedDict))
            or type(obj) is np.ndarray)


class RestrictedUnpickler(pickle._Unpickler):
    """Python's unpickler with the module docstring's rules for globals, and a BUILD step (setting an
    object's state) allowed only on records, numpy arrays and dtypes, EasyDicts and OrderedDicts: never
    on a tensor (whose legacy ``__setstate__`` would re-point or re-hook it) nor on a global."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, stream: BinaryIO):
        super().__init__(stream)
        self._placeholders: Dict[Tuple[str, str], type] = {}

    def load_build(self) -> None:
        target = self.stack[-2] if len(self.stack) >= 2 else None
        if not _may_take_state(target):
            raise pickle.UnpicklingError(f"a pickle may not set the state of a {type(target).__name__} object (BUILD)")
        pickle._Unpickler.load_build(self)

    dispatch[pickle.BUILD[0]] = load_build

    def find_class(self, module: str, name: str) -> Any:
        module, name = _python3_name(module, name)
        allowed = _ALLOWED_GLOBALS.get((module, name))
        if allowed is not None:
            return allowed
        global_name = f"{module}.{name}"
        if module.split(".", 1)[0] in DENIED_MODULES:
            raise UnsafePickleError(global_name, f"module {module!r} can run code or reach the system, and a network "
                                                 "pickle never needs it")
        if any(part.startswith("__") for part in name.split(".")):
            raise UnsafePickleError(global_name, "names with dunder parts (attribute chains) are not allowed")
        key = (module, name)
        if key not in self._placeholders:
            self._placeholders[key] = _placeholder_class(module, name)
        return self._placeholders[key]

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids appear in torch.save files, not in network pickles; "
                                     "read torch.save files with torch.load(weights_only=True)")


_ZIP_MAGIC = b"PK\x03\x04"


def read_pickle(path_or_file: Union[str, os.PathLike, BinaryIO]) -> Any:
    """Read a StyleGAN / EG3D / Portrait4D network pickle without running any code it names.

    Args:
        path_or_file: a path (str or os.PathLike) or a binary file object opened for reading.

    Returns:
        The pickled object (a checkpoint's dict comes back as a dict) with each
        persistent object replaced by a `PersistentRecord`, each object of another
        non-allow-listed class by an `ObjectRecord`, ``dnnlib`` EasyDicts by `EasyDict`,
        tensors and parameters as CPU tensors and ``torch.nn.Parameter``s, numpy arrays
        and scalars as numpy's.

    Raises:
        TypeError: `path_or_file` is neither a path nor a binary file.
        ValueError: the file is a torch.save zip archive, not a pickle.
        UnsafePickleError: the pickle names a refused global, or calls one that is not
            allow-listed (the message names it).
        pickle.UnpicklingError: malformed pickle or storage data.
    """
    if isinstance(path_or_file, (str, os.PathLike)):
        with open(path_or_file, "rb") as stream:
            return _read_stream(stream, str(path_or_file))
    if isinstance(path_or_file, io.TextIOBase) or not (hasattr(path_or_file, "read") and
                                                        hasattr(path_or_file, "readline")):
        raise TypeError("read_pickle: path_or_file must be a path or a binary file opened for reading, got "
                        f"{type(path_or_file).__name__}")
    return _read_stream(path_or_file, "path_or_file")


def _read_stream(stream: BinaryIO, where: str) -> Any:
    if stream.seekable():
        start = stream.tell()
        head = stream.read(len(_ZIP_MAGIC))
        stream.seek(start)
        if not isinstance(head, bytes):
            raise TypeError(f"read_pickle: {where} must be opened in binary mode")
        if head == _ZIP_MAGIC:
            raise ValueError(f"read_pickle: {where} is a zip archive (a torch.save file), not a network pickle; "
                             "read it with torch.load(weights_only=True)")
    return RestrictedUnpickler(stream).load()
