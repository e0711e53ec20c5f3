"""Method plug-ins: a base class, a decorator for in-tree methods, entry points for the rest.

In-tree methods live one per file under ``baselines/`` and ``methods/``; every module there is
imported on discovery, so adding a method never needs an edit inside ``harness/``. Other
packages register through the entry-point group ``qvlm_bench.methods``.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import pkgutil
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
    ``defaults`` lists the method's hyper-parameters; each record stores the resolved values.

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

    def __init__(self, **options: Any):
        bad = [k for k in options if k not in self.defaults]
        if bad:
            valid = ", ".join(self.defaults) or "(none)"
            raise ValueError(f"method {self.name!r} has no option(s) {bad}; valid: {valid}")
        self.options: dict[str, Any] = {**self.defaults, **options}

    @classmethod
    def calibrates(cls, qcfg: QuantConfig) -> bool:
        """Whether a cell at ``qcfg`` gets calibration data: always for methods that need it, and
        for any method when activations use static per-tensor ranges (they come from data)."""
        static_acts = qcfg.quantizes_acts and qcfg.a_granularity == "per_tensor"
        return bool(cls.needs_calibration or static_acts)

    def quantize(self, lm, qcfg: QuantConfig, calib) -> QuantState:
        """``lm``: a ``LoadedModel``; ``calib``: a ``CalibrationSet`` (None if not needed)."""
        raise NotImplementedError


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


def method_source_files(cls: type[Method]) -> list[Path]:
    """The files that hold a method's own code: its module, or every ``.py`` file of its package
    when it lives in a package of its own (``methods/qvlm/``), not in a shared one (``baselines``)."""
    try:
        file = Path(inspect.getsourcefile(cls) or "")
    except (TypeError, OSError):  # defined in a notebook or exec'd text: no file to hash
        return []
    if not file.is_file():
        return []
    package = cls.__module__.rpartition(".")[0]
    if package and package not in IN_TREE_PACKAGES and (file.parent / "__init__.py").is_file():
        return sorted(file.parent.rglob("*.py"))
    return [file]


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
    return files_digest(files, files[0].parent) if files else None
