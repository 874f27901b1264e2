"""Inert records that stand in for the objects of a network pickle.

`read_pickle` never imports a class named by a pickle (torch.nn layers, upstream
helpers, rasterizer settings) and never runs the source code a persistent object
carries. Each such object comes back as a record of what the pickle holds for it:

- `ObjectRecord`: an object of a class pickled by reference (NEWOBJ + BUILD, or
  copyreg's reconstructor): the class's module and name, the arguments it was
  created with, and its pickled state (its ``__dict__``).
- `PersistentRecord`: an object of a ``persistence.persistent_class`` class (StyleGAN,
  EG3D, Portrait4D): the class name, the embedded module source kept as text, the
  pickled state and the recorded constructor arguments.

A record whose state has torch.nn.Module's layout (``_parameters``, ``_buffers``,
``_modules``) is module-like: attribute access reaches its parameters, buffers and
submodules as on a Module, and `state_dict()` lists its tensors under torch's names.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, Iterator, Optional, Tuple

import torch

_MODULE_FIELDS = ("_parameters", "_buffers", "_modules")


class ObjectRecord:
    """An object of a class that was never imported: what the pickle holds for it.

    Attributes:
        module_name: module of the class as the pickle names it (``None`` when unknown).
        class_name: the class's name (qualified name for nested classes).
        new_args: positional arguments the pickle created the object with (NEWOBJ), a tuple.
        new_kwargs: keyword arguments it was created with (NEWOBJ_EX), a dict.
        state: the pickled state (the object's ``__dict__``), a dict.
        raw_state: the pickled state when it is not a dict (a class with its own
            ``__getstate__``), else ``None``.

    Other attribute names read the state, then (for module-like records) the
    parameters, buffers and submodules, as ``torch.nn.Module.__getattr__`` does;
    a state entry whose name is one of the fields above is read as ``record.state[name]``.
    """

    def __init__(self, module_name: Optional[str], class_name: str, new_args: Tuple = (),
                 new_kwargs: Optional[Dict[str, Any]] = None, state: Optional[Dict[str, Any]] = None):
        self.module_name = module_name
        self.class_name = class_name
        self.new_args = tuple(new_args)
        self.new_kwargs = dict(new_kwargs or {})
        self.state = dict(state or {})
        self.raw_state = None

    # -- pickle's BUILD step (the object's state) -------------------------------------
    def __setstate__(self, pickled_state: Any) -> None:
        """Take the pickled state of the object (BUILD): a dict, (dict or None, slot dict), or anything else,
        which is kept as `raw_state`."""
        parts = pickled_state if isinstance(pickled_state, tuple) and len(pickled_state) == 2 else None
        if parts is not None and all(part is None or isinstance(part, dict) for part in parts):
            for part in parts:
                self.state.update(part or {})
        elif isinstance(pickled_state, dict):
            self.state.update(pickled_state)
        else:
            self.raw_state = pickled_state

    # -- copies of a record are records (pickle/copy use these, not __setstate__) ---------
    def __reduce__(self):
        return _restore_record, (type(self), dict(self.__dict__))

    @property
    def qualified_name(self) -> str:
        """``module.Class`` (just ``Class`` when the module is unknown)."""
        return f"{self.module_name}.{self.class_name}" if self.module_name else self.class_name

    @property
    def is_module(self) -> bool:
        """True when the state has torch.nn.Module's ``_parameters``, ``_buffers`` and ``_modules``."""
        return all(isinstance(self.state.get(field), dict) for field in _MODULE_FIELDS)

    def __getattr__(self, name: str) -> Any:
        # Only called for names that are not fields; never for dunders (copy and pickle probe those).
        if name.startswith("__"):
            raise AttributeError(name)
        state = self.__dict__.get("state")
        if state is None:
            raise AttributeError(name)
        if name in state:
            return state[name]
        for field in _MODULE_FIELDS:
            table = state.get(field)
            if isinstance(table, dict) and name in table:
                return table[name]
        raise AttributeError(f"record of {self.qualified_name} has no attribute {name!r}")

    def named_children(self) -> Iterator[Tuple[str, "ObjectRecord"]]:
        """The submodule records of a module-like record, in registration order (``None`` entries skipped)."""
        self._require_module("named_children")
        for name, child in self.state["_modules"].items():
            if child is not None:
                yield name, child

    def state_dict(self, prefix: str = "") -> "OrderedDict[str, torch.Tensor]":
        """The module tree's parameters and buffers under torch's names, as ``Module.state_dict()`` lists them.

        For each module: its parameters, then its buffers minus the names in its
        ``_non_persistent_buffers_set``, then each submodule's entries under
        ``name.``; ``None`` entries are skipped. Values are the tensors detached
        (shapes and dtypes as pickled). Extra state a class's own code would add
        (``get_extra_state``) is not known without that code and is not listed.
        Raises TypeError for a record that is not module-like or an entry that is not
        a tensor, ValueError for a module tree that contains itself.
        """
        self._require_module("state_dict")
        entries: "OrderedDict[str, torch.Tensor]" = OrderedDict()
        self._collect_state(prefix, entries, active=set())
        return entries

    def _collect_state(self, prefix: str, entries: "OrderedDict[str, torch.Tensor]", active: set) -> None:
        if id(self) in active:
            raise ValueError(f"the module tree contains itself at {prefix.rstrip('.') or '<root>'}")
        active.add(id(self))
        state = self.state
        non_persistent = state.get("_non_persistent_buffers_set") or ()
        for field, skipped in (("_parameters", ()), ("_buffers", non_persistent)):
            for name, value in state[field].items():
                if value is None or name in skipped:
                    continue
                if not isinstance(value, torch.Tensor):
                    raise TypeError(f"{prefix}{name}: expected a tensor in {field}, got {type(value).__name__}")
                entries[prefix + name] = value.detach()
        for name, child in state["_modules"].items():
            if child is None:
                continue
            if not isinstance(child, ObjectRecord) or not child.is_module:
                raise TypeError(f"{prefix}{name}: expected a module record in _modules, got {type(child).__name__}")
            child._collect_state(f"{prefix}{name}.", entries, active)
        active.discard(id(self))

    def _require_module(self, what: str) -> None:
        if not self.is_module:
            raise TypeError(f"{what}: the record of {self.qualified_name} is not a torch.nn.Module "
                            f"(its state has no {', '.join(_MODULE_FIELDS)})")

    def _summary(self) -> str:
        if not self.is_module:
            return f"{len(self.state)} attributes"
        return ", ".join(f"{len(self.state[field])} {field.strip('_')}" for field in _MODULE_FIELDS)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.qualified_name}: {self._summary()})"


class PersistentRecord(ObjectRecord):
    """An object of a ``persistence.persistent_class`` class, as its pickle describes it.

    Attributes (besides `ObjectRecord`'s; ``module_name`` is ``None``: the pickle
    carries the defining file's source, not its module's name):
        module_src: the full text of the file that defined the class, never executed.
        version: the persistence format version recorded in the pickle (6 for every
            known StyleGAN2-ADA, StyleGAN3, EG3D and Portrait4D pickle).
    """

    def __init__(self, class_name: str, module_src: Optional[str], version: Any, state: Dict[str, Any]):
        super().__init__(None, class_name, state=state)
        self.module_src = module_src
        self.version = version

    @property
    def init_args(self) -> tuple:
        """The positional arguments the object was constructed with (``_init_args``), a tuple."""
        return self._recorded("_init_args")

    @property
    def init_kwargs(self) -> dict:
        """The keyword arguments the object was constructed with (``_init_kwargs``), a dict."""
        return self._recorded("_init_kwargs")

    def _recorded(self, key: str) -> Any:
        if key not in self.state:
            raise AttributeError(f"the pickled state of {self.class_name} has no {key}: "
                                 "the object was not built through a persistent_class constructor")
        return self.state[key]


def _restore_record(record_type: type, fields: Dict[str, Any]) -> ObjectRecord:
    """Rebuild a record from its fields (copy.deepcopy and pickle of records use this)."""
    record = object.__new__(record_type)
    record.__dict__.update(fields)
    return record
