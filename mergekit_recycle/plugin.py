"""mergekit-recycle as a mergekit plugin, for code that merges. The import hook that gives any
program importing mergekit `recycle_linear` and the architecture corrections is the top-level
module `mergekit_recycle_hook` (the installed `mergekit_recycle.pth` and this package install it);
`register()` does the same at once, whatever was imported first."""

from mergekit_recycle_hook import correct_architectures


def register() -> None:
    """Register `recycle_linear` and correct the architecture definitions now (idempotent)."""
    from mergekit_recycle.recycle_linear import register_method

    register_method()
    correct_architectures()
