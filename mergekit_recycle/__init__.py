"""mergekit-recycle: turn a pool of discarded checkpoints into one better model.

Importing this package is light (no mergekit, no torch): it only installs the plugin hook
(the top-level `mergekit_recycle_hook`), which registers the `recycle_linear` merge method with
mergekit, and corrects mergekit's definitions of the architectures transformers 5 saves
differently (architecture.py), as soon as mergekit itself is imported. The installed
`mergekit_recycle.pth` installs the hook at every interpreter start without importing this
package, so that mergekit's own CLIs (`mergekit-yaml`) know the method too; installing it here
covers a source checkout without the `.pth`.
"""

import mergekit_recycle_hook

__version__ = "0.1.0"

mergekit_recycle_hook.install()

__all__ = ["__version__"]
