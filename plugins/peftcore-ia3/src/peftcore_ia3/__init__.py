"""IA3 for peftcore: learned vectors that rescale keys, values and feed-forward activations.

peftcore finds this package through its entry points (``peftcore.methods``: ``ia3``;
``peftcore.layers``: ``ia3.linear``, ``ia3.hf_conv1d``); importing it is not needed to use it.
"""

from peftcore_ia3.config import IA3Config
from peftcore_ia3.layers import IA3Layer, IA3Spec
from peftcore_ia3.method import IA3Method

__version__ = "0.1.0"
__all__ = ["IA3Config", "IA3Layer", "IA3Method", "IA3Spec", "__version__"]
