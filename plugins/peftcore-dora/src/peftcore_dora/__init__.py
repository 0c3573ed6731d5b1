"""DoRA for peftcore: weight-decomposed low-rank adaptation.

peftcore finds this package through its entry points (``peftcore.methods``: ``dora``;
``peftcore.layers``: ``dora.linear``, ``dora.hf_conv1d``); importing it is not needed to use it.
"""

from peftcore_dora.config import DoraConfig
from peftcore_dora.layers import DoraLayer, reference_dora_weight
from peftcore_dora.method import DoraMethod

__version__ = "0.1.0"
__all__ = ["DoraConfig", "DoraLayer", "DoraMethod", "reference_dora_weight", "__version__"]
