"""mergekit-recycle: turn a pool of discarded checkpoints into one better model.

Importing this package registers the `recycle_linear` merge method with mergekit, and corrects
mergekit's definitions of the architectures transformers 5 saves differently (architecture.py).
"""

from mergekit.merge_methods import registry as _registry

from mergekit_recycle.architecture import correct_mergekit_definitions
from mergekit_recycle.recycle_linear import recycle_linear

__version__ = "0.1.0"

if recycle_linear.spec.name not in {m.spec.name for m in _registry.registered_methods()}:
    _registry.register(recycle_linear)
correct_mergekit_definitions()

__all__ = ["recycle_linear", "__version__"]
