"""Moved to ``fre_torch.core.allocator`` (the detector applies it itself on the CPU); kept so imports still work."""

from ..core.allocator import (DEFAULT_RETAIN_BYTES, ENV_OPT_OUT, retain_freed_memory, retain_if_requested,
                              retain_requested)

__all__ = ["DEFAULT_RETAIN_BYTES", "ENV_OPT_OUT", "retain_freed_memory", "retain_if_requested", "retain_requested"]
