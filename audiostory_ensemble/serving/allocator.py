"""The server's memory allocator: jemalloc preloaded (the default), or glibc's malloc.

Why: glibc's malloc fragments under the server's traffic (large response buffers made and freed on
many threads), so over a soak the server's anonymous memory kept growing; Triton's own
documentation recommends jemalloc or tcmalloc for that. Preloaded into ``tritonserver``, jemalloc
reaches every python stub and vLLM engine the server starts, since they inherit its environment.
``AUDIOSTORY_ALLOCATOR=system`` keeps glibc's; any other value is refused.

One rule for both ways the server starts: the server helper (:func:`triton_server.server_env`)
merges :func:`preload_env` into the server's environment, and the container's entrypoint runs
``python3 -m audiostory_ensemble.serving.allocator``, which prints the same variables as shell
``export`` lines (exit status 2 and a message naming the variable for a value it refuses).
"""

from __future__ import annotations

import ctypes.util
import functools
import os
import shlex
import sys
from collections.abc import Mapping

ALLOCATORS = ("jemalloc", "system")
JEMALLOC_CONF = "background_thread:true"    # return freed pages to the system from a thread of its own


def requested(env: Mapping[str, str]) -> str:
    """The allocator ``env`` asks for (``AUDIOSTORY_ALLOCATOR``, default jemalloc); any other value
    is a ``ValueError`` naming the variable and the allowed values."""
    allocator = env.get("AUDIOSTORY_ALLOCATOR", ALLOCATORS[0])
    if allocator not in ALLOCATORS:
        raise ValueError(f"AUDIOSTORY_ALLOCATOR must be one of {', '.join(ALLOCATORS)}, not {allocator!r}")
    return allocator


@functools.cache
def jemalloc_library() -> str | None:
    """jemalloc's shared library as the loader names it, or None when it is not installed (looked up
    once: ``find_library`` runs ``ldconfig``)."""
    return ctypes.util.find_library("jemalloc")


def preload_env(env: Mapping[str, str]) -> dict[str, str]:
    """The variables to set on top of ``env`` for the allocator it asks for: ``LD_PRELOAD`` with
    jemalloc in front (once) and ``MALLOC_CONF``; nothing for ``system``, or when jemalloc is not
    installed or already preloaded."""
    jemalloc = jemalloc_library() if requested(env) == "jemalloc" else None
    preload = env.get("LD_PRELOAD", "")
    if not jemalloc or jemalloc in preload.split(":"):
        return {}
    return {"LD_PRELOAD": ":".join(p for p in (jemalloc, preload) if p),
            "MALLOC_CONF": env.get("MALLOC_CONF", JEMALLOC_CONF)}


def main() -> int:
    try:
        changes = preload_env(os.environ)
    except ValueError as e:
        print(f"allocator: {e}", file=sys.stderr)
        return 2
    if requested(os.environ) == "jemalloc" and jemalloc_library() is None:
        print("allocator: jemalloc is not installed; the server runs on glibc's malloc", file=sys.stderr)
    for name, value in changes.items():
        print(f"export {name}={shlex.quote(value)}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
