"""fastmnist: a tiny no-FC CNN for MNIST with a fused Conv2d+ReLU+BatchNorm2d operator.

Python API (the command line calls the same functions):
    clf = fastmnist.load("runs/my-run")     # a run folder or its model.pt -> Classifier
    clf.predict(images)                     # digits and 10 probabilities per image
    fastmnist.train(epochs=1, out="runs/x") # the metrics dict `fastmnist train` writes
    fastmnist.evaluate("runs/x")            # test accuracy, overall and per digit
    fastmnist.fuse(my_net)                  # my_net with our fused Conv+ReLU+BN / Conv+ReLU+AvgPool ops
"""
__version__ = "0.1.0"

from fastmnist.ops import fused_available, fused_unavailable_reason  # noqa: E402
# fastmnist.train names both a module and the API's function. Importing a submodule binds it as an
# attribute of the package, once, on its first import; so the module is imported first and the
# function bound after, and the name stays the function (the module: importlib.import_module).
import fastmnist.train  # noqa: E402,F401
from fastmnist.api import Classifier, InputError, ModelInfo, Predictions, evaluate, load, train  # noqa: E402
from fastmnist.fusion import FuseReport, fuse  # noqa: E402

__all__ = [
    "load", "Classifier", "Predictions", "ModelInfo", "InputError", "train", "evaluate", "fuse", "FuseReport",
    "fused_available", "fused_unavailable_reason", "__version__",
]
