"""The `ONELLM_*` switches read from the environment, parsed in one place.

A switch is on/off: unset or empty means "not set" (the caller's default applies);
`0`, `false`, `no` and `off` (any case) mean off; anything else means on.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

EXTRA_BUFTS = "ONELLM_LLAMA_EXTRA_BUFTS"  # llama.cpp's extra CPU buffer types (weight repacking)
ADAPTIVE_THREADS = "ONELLM_ADAPTIVE_THREADS"  # llama.cpp's thread count follows the free cores
WAIT_POLICY = "ONELLM_WAIT_POLICY"  # libgomp's wait policy (native spin or passive)

_OFF = ("0", "false", "no", "off")


def env_flag(name: str, environ: Mapping[str, str] | None = None) -> bool | None:
    """An on/off switch: None when unset or empty, else False for 0/false/no/off, True otherwise."""
    value = (os.environ if environ is None else environ).get(name, "").strip().lower()
    if not value:
        return None
    return value not in _OFF
