"""Ops with a plain-PyTorch reference and optional fused backends (see ``dispatch``)."""
