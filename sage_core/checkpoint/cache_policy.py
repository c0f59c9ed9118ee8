"""Moved to `sage_core.offload.cache_policy` (issue 21); this name stays for old imports."""

import sys

from sage_core.offload import cache_policy as _moved

sys.modules[__name__] = _moved
