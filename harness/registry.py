"""Method plug-ins: a base class, a decorator for in-tree methods, entry points for the rest.

In-tree methods live one per file under ``baselines/`` and ``methods/``; every module there is
imported on discovery, so adding a method never needs an edit inside ``harness/``. Other
packages register through the entry-point group ``qvlm_bench.methods``.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import importlib
import importlib.util
import inspect
import pkgutil
import typing
from pathlib import Path
from typing import Any, ClassVar

from .quant.config import QuantConfig
from .quant.state import QuantState

ENTRY_POINT_GROUP = "qvlm_bench.methods"
IN_TREE_PACKAGES = ("baselines", "methods")

_REGISTRY: dict[str, type["Method"]] = {}
_BROKEN: dict[str, str] = {}  # module or entry point -> "ErrorType: message"
_discovered = False


class UnknownMethodError(KeyError):
    def __str__(self) -> str:  # KeyError would quote the whole message
        return self.args[0]


class Method:
    """A post-training quantization method.

    Subclasses set ``name`` and implement ``quantize``, which returns a ``QuantState`` and leaves
    the model exactly as it found it (the runner reuses one loaded model for every cell).
    Hyper-parameters are a dataclass ``Options`` (fields with defaults and types): a suite's
    values are checked against the field types, ``self.opts`` is the typed instance, and
    ``self.options`` / ``defaults`` the same values as a dict (each record stores them).
    Methods from before ``Options`` may still set a plain ``defaults`` dict.

    The engine asks the class, never the name: ``reference`` marks the float reference every Δ is
    measured against (run once per model, unquantized); ``quantizes = False`` marks a *control*
    that changes float weights only (e.g. an encoder fine-tuned without quantizing), so the
    engine does not require every target layer in its state; ``presets`` names option sets
    (e.g. a reduced budget) so a row that uses one is labelled with its name.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = False
    defaults: ClassVar[dict[str, Any]] = {}
    reference: ClassVar[bool] = False
    quantizes: ClassVar[bool] = True
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    Options: ClassVar[type | None] = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        opts = cls.__dict__.get("Options")
        if opts is not None:
            if not dataclasses.is_dataclass(opts):
                raise TypeError(f"{cls.__name__}.Options must be a dataclass")
            cls.defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                            for f in dataclasses.fields(opts)}

    def __init__(self, **options: Any):
        bad = [k for k in options if k not in self.defaults]
        if bad:
            valid = ", ".join(self.defaults) or "(none)"
            raise ValueError(f"method {self.name!r} has no option(s) {bad}; valid: {valid}")
        self.options: dict[str, Any] = {**self.defaults, **options}
        self.opts = None
        if self.Options is not None:
            check_option_types(self.name, self.Options, options)
            self.opts = self.Options(**self.options)

    @classmethod
    def calibrates(cls, qcfg: QuantConfig) -> bool:
        """Whether a cell at ``qcfg`` gets calibration data: always for methods that need it, and
        for any method when activations use static per-tensor ranges (they come from data)."""
        static_acts = qcfg.quantizes_acts and qcfg.a_granularity == "per_tensor"
        return bool(cls.needs_calibration or static_acts)

    def quantize(self, lm, qcfg: QuantConfig, calib) -> QuantState:
        """``lm``: a ``LoadedModel``; ``calib``: a ``CalibrationSet`` (None if not needed)."""
        raise NotImplementedError


def _accepts(hint, value) -> bool:
    """Whether ``value`` fits a simple annotation (bool, int, float, str, their Optional/Union,
    Literal, list/tuple); anything more elaborate is left to the dataclass's own checks."""
    origin = typing.get_origin(hint)
    if hint is typing.Any:
        return True
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", typing.Union)):
        return any(_accepts(h, value) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple) or hint in (list, tuple):
        return isinstance(value, (list, tuple))
    return True


def check_option_types(method: str, options_cls: type, values: dict[str, Any]) -> None:
    """Raise ValueError naming the option, the type it needs and the value given."""
    hints = typing.get_type_hints(options_cls)
    for key, value in values.items():
        hint = hints.get(key)
        if hint is not None and not _accepts(hint, value):
            if typing.get_origin(hint) is typing.Literal:
                want = "one of " + ", ".join(map(str, typing.get_args(hint)))
            else:
                want = getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
            raise ValueError(f"method {method!r} option {key!r} must be {want}, got {value!r} "
                             f"({type(value).__name__})")


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator (or plain call) that makes a method available by its ``name``."""
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"{cls!r} is not a subclass of harness.registry.Method")
    if not cls.name:
        raise ValueError(f"{cls.__name__} must set a non-empty `name`")
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls and (
            existing.__module__, existing.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"method name {cls.name!r} is taken by {existing.__module__}.{existing.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _import_in_tree() -> None:
    """Import every module under the in-tree packages, each on its own: one that fails to import
    is recorded in ``broken_methods()`` and the others still register."""
    for pkg_name in IN_TREE_PACKAGES:
        try:
            pkg = importlib.import_module(pkg_name)
        except Exception as exc:  # noqa: BLE001 - any import failure is reported, not fatal
            _BROKEN[pkg_name] = _error(exc)
            continue

        def failed(name: str) -> None:  # a subpackage whose __init__ raised while walking
            import sys

            _BROKEN[name] = _error(sys.exc_info()[1])
        for info in pkgutil.walk_packages(pkg.__path__, prefix=f"{pkg_name}.", onerror=failed):
            if info.name in _BROKEN and info.ispkg:
                continue
            try:
                importlib.import_module(info.name)
                _BROKEN.pop(info.name, None)
            except Exception as exc:  # noqa: BLE001
                _BROKEN[info.name] = _error(exc)


def _load_entry_points() -> None:
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        key = f"entry point {ep.name} = {ep.value}"
        try:
            obj = ep.load()
        except Exception as exc:  # noqa: BLE001
            _BROKEN[key] = _error(exc)
            continue
        _BROKEN.pop(key, None)
        if isinstance(obj, type) and issubclass(obj, Method):
            register_method(obj)


def discover(refresh: bool = False) -> None:
    """Import in-tree methods and load entry points (again when ``refresh``, e.g. after installs
    or to retry modules that failed to import)."""
    global _discovered
    if refresh or not _discovered:
        _discovered = True
        _import_in_tree()
        _load_entry_points()


def available_methods() -> dict[str, type[Method]]:
    discover()
    return dict(sorted(_REGISTRY.items()))


def broken_methods() -> dict[str, str]:
    """Modules (or entry points) that failed to import during discovery, with their errors."""
    discover()
    return dict(_BROKEN)


def get_method(name: str) -> type[Method]:
    methods = available_methods()
    if name not in methods and _BROKEN:  # a module may have been fixed since: try once more
        discover(refresh=True)
        methods = available_methods()
    if name not in methods:
        msg = f"unknown method {name!r}; valid methods: {', '.join(methods)}"
        if _BROKEN:
            msg += "; modules that failed to import: " + "; ".join(f"{m} ({e})" for m, e in _BROKEN.items())
        raise UnknownMethodError(msg)
    return methods[name]


def reference_method() -> str:
    """The name of the method that declares itself the float reference (``reference = True``)."""
    refs = [name for name, cls in available_methods().items() if cls.reference]
    if len(refs) != 1:
        raise RuntimeError(f"exactly one registered method must set `reference = True`; found {refs or 'none'}")
    return refs[0]


REPO_ROOT = Path(__file__).resolve().parents[1]
SOURCE_PACKAGES = ("harness", "baselines", "methods", "tasks")  # the project's own source trees


def _module_file(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError, AttributeError):
        return None
    origin = getattr(spec, "origin", None) if spec else None
    return Path(origin).resolve() if origin and origin.endswith(".py") else None


def _imported_modules(file: Path, module: str) -> set[str]:
    """Module names a source file imports (relative imports resolved against ``module``)."""
    package = module if file.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - node.level + 1] if node.level > 1 else parts
                base = ".".join(parts + ([node.module] if node.module else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)  # ``from pkg import module``
    return out


def method_source_files(cls: type[Method]) -> list[Path]:
    """The files that decide a method's numbers: its module (or every ``.py`` file of its package
    when it lives in a package of its own, like ``methods/qvlm/``) and, transitively, every file of
    the same source tree it imports, so a baseline built on ``awq.py`` is re-keyed when
    ``awq.py`` changes. The tree is this repository for in-tree methods, the method's top-level
    package for one installed elsewhere."""
    try:
        file = Path(inspect.getsourcefile(cls) or "").resolve()
    except (TypeError, OSError):  # defined in a notebook or exec'd text: no file to hash
        return []
    if not file.is_file():
        return []
    package = cls.__module__.rpartition(".")[0]
    own = [file]
    if package and package not in IN_TREE_PACKAGES and (file.parent / "__init__.py").is_file():
        own = sorted(file.parent.rglob("*.py"))
    top = cls.__module__.split(".")[0]
    if file.is_relative_to(REPO_ROOT):
        trees = [REPO_ROOT / p for p in SOURCE_PACKAGES]
    else:
        init = _module_file(top)
        trees = [init.parent if init is not None and init.name == "__init__.py" else file.parent]
    root = REPO_ROOT if file.is_relative_to(REPO_ROOT) else trees[0]
    seen: dict[Path, str] = {}
    todo = [(f, _module_of(f, root, cls.__module__, file)) for f in own]
    while todo:
        f, mod = todo.pop()
        if f in seen:
            continue
        seen[f] = mod
        for name in _imported_modules(f, mod):
            dep = _module_file(name)
            if dep is not None and dep not in seen and any(dep.is_relative_to(t) for t in trees):
                todo.append((dep, name))
    return sorted(seen)


def _module_of(f: Path, root: Path, cls_module: str, cls_file: Path) -> str:
    if f == cls_file:
        return cls_module
    rel = f.relative_to(root).with_suffix("") if f.is_relative_to(root) else Path(f.stem)
    parts = list(rel.parts)
    if parts and parts[-1] == "__init__":
        parts = parts[:-1]
        return ".".join(parts)
    return ".".join(parts)


def files_digest(files: list[Path], root: Path) -> str:
    """A short sha256 over files' paths (relative to ``root``) and contents, in sorted order."""
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f"{f.relative_to(root).as_posix()}\0".encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def method_code_digest(name: str) -> str | None:
    """A hash of the method's own source (``method_source_files``): with the engine's code
    (``harness.cells``) part of every cache key, so editing a method recomputes its cells and
    quantization states instead of serving stale ones. None for an unknown method."""
    try:
        cls = get_method(name)
    except UnknownMethodError:
        return None
    files = method_source_files(cls)
    if not files:
        return None
    root = REPO_ROOT if all(f.is_relative_to(REPO_ROOT) for f in files) else files[0].parent
    return files_digest(files, root)
