"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020; parallel: He et al. 2022)."""

from peftcore.tuners.adapter.config import AdapterConfig
from peftcore.tuners.adapter.method import AdapterMethod

__all__ = ["AdapterConfig", "AdapterMethod"]
