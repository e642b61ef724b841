"""nmsparse: hardware-friendly structured sparsity for training and deploying PyTorch models."""

from . import formats, nn, patterns
from .common import __version__
from .formats import *  # noqa: F401,F403
from .nn import *  # noqa: F401,F403
from .patterns import *  # noqa: F401,F403
# transposable_mask: the dispatching front in kernels/ (the compiled exact solver on the CPU,
# patterns.transposable_mask otherwise), in place of the pure-PyTorch one that patterns exports.
from .kernels.transposable import transposable_mask  # noqa: F811
from .prune import adaprune, magnitude_prune, prune_trained_model, sparsegpt_prune, wanda_prune

__all__ = (list(patterns.__all__) + list(formats.__all__) + list(nn.__all__)
           + ["adaprune", "magnitude_prune", "prune_trained_model", "wanda_prune", "sparsegpt_prune"])


def __getattr__(name):
    # nmsparse.gradient_fidelity (train/fidelity.py), imported on first use: `import nmsparse` stays light.
    if name == "gradient_fidelity":
        from .train.fidelity import gradient_fidelity

        return gradient_fidelity
    raise AttributeError(f"module 'nmsparse' has no attribute {name!r}")
