"""fastmnist: a tiny no-FC CNN for MNIST with a fused Conv2d+ReLU+BatchNorm2d operator."""
from fastmnist.ops import fused_available, fused_unavailable_reason

__version__ = "0.1.0"
__all__ = ["fused_available", "fused_unavailable_reason", "__version__"]
