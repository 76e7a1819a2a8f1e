"""Pure PyTorch model code. Knows nothing of training, data or distribution.

`MoETransformer` and `ModelOutput` load on first use, so that reading a preset (pure config) does
not import torch: `moelab train --preset typo` is refused in a fraction of a second.
"""

__all__ = ["MoETransformer", "ModelOutput"]


def __getattr__(name):
    if name in __all__:
        from moelab.models import transformer

        return getattr(transformer, name)
    raise AttributeError(f"module 'moelab.models' has no attribute {name!r}")
