"""Pure-Python client for kvstream workers (docs/PROTOCOL.md, protocol version 1.1).

One Client wraps one ZeroMQ DEALER socket. It is not thread-safe: use one per thread.
Every call takes an optional timeout (seconds; default the client's); on expiry it raises
KvsTimeout and late replies to that request are discarded.
"""
from .client import Client, KvsError, KvsTimeout, PROTOCOL_MINOR, PROTOCOL_VERSION, Watch

__all__ = ["Client", "KvsError", "KvsTimeout", "PROTOCOL_MINOR", "PROTOCOL_VERSION", "Watch"]
__version__ = "0.2.0"
