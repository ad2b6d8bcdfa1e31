"""Which ``Host`` a request may name: the server's defence against DNS rebinding.

A web page the user visits can rebind its own domain to 127.0.0.1 and then, as its own origin,
read and drive a server on the user's machine: the browser still sends the page's name in
``Host``. So a request naming a host the server was not told about is refused (400, one line)
before anything else. The names accepted (:class:`HostCheck`), any port with each:

- the loopback names ``localhost``, ``127.0.0.1`` and ``[::1]``, when the server listens on a
  loopback address (the default, 127.0.0.1) or on every interface (0.0.0.0, ``::``);
- the address the server listens on, when that is another one (``--host 192.168.1.5``);
- any IP address, when the server listens on every interface: a page can only make its browser
  send an address it really connects to, never rebind one;
- the names given in ``allowed_hosts`` (``--allowed-hosts``): those a proxy or DNS gives the
  server; ``*`` accepts any ``Host`` (the user's choice: no rebinding defence).

A request without ``Host`` (HTTP/1.0; no browser omits it) passes; one naming it twice is refused.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from trainfer.errors import InputError

__all__ = ["ANY_HOST", "LOOPBACK_NAMES", "HostCheck", "check_allowed_hosts"]

#: The names of the loopback interface a browser on this machine sends.
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
#: In ``allowed_hosts``: accept any ``Host``.
ANY_HOST = "*"
#: Accepted ``Host`` values remembered as such (a server sees a handful; bounded all the same).
_REMEMBERED = 64
_HOST = b"host"


def check_allowed_hosts(names: Iterable[str], what: str) -> tuple[str, ...]:
    """``names`` as the host names :class:`HostCheck` compares (lower case), each a name or an
    address without a port (an IPv6 address in brackets), or ``*``; else an :class:`InputError`."""
    if isinstance(names, str):
        raise InputError(f"{what} must be a list of host names; got the string {names!r}")
    checked = []
    for name in names:
        bare = name.strip("[]")
        plain = name == ANY_HOST or (name and all(c.isascii() and (c.isalnum() or c in "-._") for c in name))
        if not (plain or (name == f"[{bare}]" and _address(bare) is not None)):
            raise InputError(
                f"{what}: {name!r} is not a host name: expected names like 'example.com' or '10.0.0.5' or "
                "'[::1]' (no port, no scheme), or '*' for any"
            )
        checked.append(name.lower())
    return tuple(checked)


class HostCheck:
    """Whether a request's ``Host`` header names this server (see the module's rules)."""

    def __init__(self, listening: str, allowed: Iterable[str] = ()):
        """``listening``: the address (or name) the server is bound to; ``allowed``: more names
        (:func:`check_allowed_hosts`' form)."""
        address = _address(listening.strip("[]"))
        everywhere = address is not None and address.is_unspecified
        local = everywhere or listening == "localhost" or (address is not None and address.is_loopback)
        listened = f"[{address}]" if address is not None and address.version == 6 else listening.lower()
        self.names = frozenset([*allowed, *(LOOPBACK_NAMES if local else ()), *(() if local else (listened,))])
        self.any_host = ANY_HOST in self.names
        self.any_address = everywhere
        self._accepted: set[bytes] = set()

    def refusal(self, headers: list[tuple[bytes, bytes]]) -> str | None:
        """Why a request with these ASGI ``headers`` is refused, or None to serve it."""
        if self.any_host:
            return None
        given = [value for name, value in headers if name == _HOST]
        if not given or (len(given) == 1 and given[0] in self._accepted):
            return None
        if len(given) > 1:
            return f"header Host given {len(given)} times: a request names one host"
        if not self._names_this_server(given[0]):
            shown = given[0].decode("latin-1")[:200]
            return (
                f"Host {shown!r} is not a name of this server: it answers {self.described()} (any port); "
                "name others with --allowed-hosts (ServerSettings.allowed_hosts)"
            )
        if len(self._accepted) < _REMEMBERED:
            self._accepted.add(given[0])
        return None

    def described(self) -> str:
        """The accepted hosts in words, for the refusal."""
        listed = ", ".join(sorted(self.names))
        return f"{listed} and any IP address" if self.any_address else listed

    def _names_this_server(self, value: bytes) -> bool:
        """Whether ``value`` (``name``, ``name:port``, ``[v6]`` or ``[v6]:port``) names an accepted host."""
        name = value.decode("latin-1").lower()
        if ":" in name and not name.endswith("]"):
            name, _, port = name.rpartition(":")
            if not (port.isascii() and port.isdigit()):
                return False
        if name in self.names:
            return True
        return self.any_address and _address(name[1:-1] if name.startswith("[") else name) is not None


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``text`` as an IP address, or None when it is not one."""
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None
