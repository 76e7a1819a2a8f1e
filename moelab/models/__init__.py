"""Pure PyTorch model code. Knows nothing of training, data or distribution."""

from moelab.models.transformer import ModelOutput, MoETransformer

__all__ = ["MoETransformer", "ModelOutput"]
