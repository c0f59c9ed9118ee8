"""Moved to `sage_core.offload.expert_trace` (issue 21); this name stays for old imports."""

import sys

from sage_core.offload import expert_trace as _moved

sys.modules[__name__] = _moved
