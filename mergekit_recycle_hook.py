"""mergekit-recycle's import hook: `recycle_linear` and the architecture corrections for any program
that imports mergekit (`mergekit-yaml` included), not only for mergekit-recycle's own commands.

mergekit 0.1.x discovers no plugins, so the installed `mergekit_recycle.pth` calls `install()` at
every interpreter start. It is a top-level module, not part of the package, and imports nothing but
`sys`: every Python start pays for it, and importing `mergekit_recycle` there would fix which copy of
the package the interpreter uses before the working directory joins `sys.path` (a source checkout
there would be shadowed). The finder it puts on `sys.meta_path` runs a hook once mergekit's
merge-method package or its architecture package has been imported, by whatever program; only
the hook imports `mergekit_recycle`. Importing `mergekit_recycle` installs it too, so a source
checkout without the `.pth` behaves the same.
"""

import sys

# typing alone costs 5 ms of every interpreter start: only type checkers import it.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Dict, Optional, Set

# Marks a finder of this module on sys.meta_path, whichever copy of the module (or of its class,
# after importlib.reload) made it.
MARKER = "mergekit_recycle_hook"


def _register_method() -> None:
    # Importing the module registers the method (its last line). When that module is the one
    # importing mergekit right now, this import returns it half-built, and it registers at its end.
    import mergekit_recycle.recycle_linear  # noqa: F401


def correct_architectures() -> None:
    """Correct mergekit's definitions of the architectures transformers 5 saves differently."""
    from mergekit_recycle.architecture import correct_mergekit_definitions

    correct_mergekit_definitions()


# mergekit's packages to watch, and what to do once one has been imported (each is idempotent).
# The packages, not their submodules: by the time a package's __init__ has run, everything our
# code imports from it is complete.
HOOKS: "Dict[str, Callable[[], None]]" = {
    "mergekit.merge_methods": _register_method,
    "mergekit.architecture": correct_architectures,
}


def _run(name: str) -> None:
    """Run the hook of `name`; a failure warns rather than breaking mergekit's own import."""
    try:
        HOOKS[name]()
    except Exception as exc:  # noqa: BLE001 - a plugin must never stop mergekit from loading
        import warnings  # only here: every interpreter start imports this module

        warnings.warn(f"mergekit-recycle could not extend {name} ({type(exc).__name__}: {exc}); "
                      "recycle_linear may be unavailable", RuntimeWarning, stacklevel=2)


class _HookedLoader:
    """Wraps a module's loader: executes the module, then runs its hook."""

    def __init__(self, loader: "Any"):
        self.loader = loader

    def create_module(self, spec: "Any") -> "Any":
        return self.loader.create_module(spec)

    def exec_module(self, module: "Any") -> None:
        # The module keeps its real loader (for reloads, inspect, importlib.resources).
        module.__loader__ = module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        _run(module.__name__)

    def __getattr__(self, name: str) -> "Any":
        return getattr(self.loader, name)


class PostImportFinder:
    """A `sys.meta_path` finder that finds nothing itself: for a watched package it asks the
    finders after it for the spec and wraps the loader, so that the hook runs after the import."""

    mergekit_recycle_hook = True  # MARKER

    def __init__(self) -> None:
        # Names this finder is looking up now: another finder that asks every finder (a second
        # copy of this one) asks this one again, which must then answer None, not recurse.
        self.busy: "Set[str]" = set()

    def find_spec(self, fullname: str, path: "Any" = None, target: "Any" = None) -> "Optional[Any]":
        if fullname not in HOOKS or fullname in self.busy:
            return None
        self.busy.add(fullname)
        try:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                        spec.loader = _HookedLoader(spec.loader)
                    return spec
            return None
        finally:
            self.busy.discard(fullname)


def install() -> None:
    """Watch mergekit's imports (one finder per interpreter); run the hooks of packages already imported."""
    if not any(getattr(finder, MARKER, False) is True for finder in sys.meta_path):
        sys.meta_path.insert(0, PostImportFinder())
    for name in HOOKS:
        if name in sys.modules:
            _run(name)
