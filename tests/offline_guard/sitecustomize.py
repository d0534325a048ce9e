"""Block every connection that leaves the machine, and record the attempt (distilkit's offline proof)."""

import os
import socket

_LOG = os.environ["DISTILKIT_BLOCKED_LOG"]
_connect = socket.socket.connect
_connect_ex = socket.socket.connect_ex


def _local(sock, address):
    if sock.family == getattr(socket, "AF_UNIX", None):
        return True
    host = address[0] if isinstance(address, tuple) else address
    return host in ("127.0.0.1", "::1", "localhost") or str(host).startswith("127.")


def _guard(method):
    def guarded(self, address, *args):
        if not _local(self, address):
            with open(_LOG, "a") as log:
                log.write(f"{address}\n")
            raise OSError(f"network blocked by the offline test: {address}")
        return method(self, address, *args)

    return guarded


socket.socket.connect = _guard(_connect)
socket.socket.connect_ex = _guard(_connect_ex)

_getaddrinfo = socket.getaddrinfo


def getaddrinfo(host, *args, **kwargs):
    if host not in (None, "localhost", "127.0.0.1", "::1", "") and not str(host).startswith("127."):
        with open(_LOG, "a") as log:
            log.write(f"resolve {host}\n")
        raise socket.gaierror(f"name resolution blocked by the offline test: {host}")
    return _getaddrinfo(host, *args, **kwargs)


socket.getaddrinfo = getaddrinfo
