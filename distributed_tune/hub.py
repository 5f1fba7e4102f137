"""Whether the Hugging Face Hub can be reached, asked once before anything waits on the hub
client's retries (~45 s without network). Imports nothing heavy.

    if offline_reason() is None: ...     # None: the hub answered; else why not, in a few words
"""

from __future__ import annotations

import functools
import os
import socket
import urllib.parse

DEFAULT_ENDPOINT = "https://huggingface.co"


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT)


@functools.cache
def offline_reason(timeout_s: float = 3.0) -> str | None:
    """None when a TCP connection to the hub's endpoint opens; else why it cannot be used."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return "HF_HUB_OFFLINE is set"
    url = urllib.parse.urlparse(endpoint())
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout_s).close()
        return None
    except OSError as e:
        return f"{endpoint()} cannot be reached: {e.strerror or e}"
