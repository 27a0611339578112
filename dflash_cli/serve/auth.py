"""Who may talk to a server: loopback by default, an API key (Bearer, compared in constant time) for
anything else, or an explicit --no-auth. Shared by `dflash serve` and the SGLang/vLLM hand-off, so
both refuse the same unsafe start-ups."""
from __future__ import annotations

import hmac
import ipaddress

from ..errors import UsageError


def is_loopback(host: str) -> bool:
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere: treat it as exposed


def clean_api_key(api_key: str | None) -> str | None:
    """The key as clients will send it: surrounding whitespace dropped (a key read from a file into
    DFLASH_API_KEY keeps its newline, which no client can send); an empty or blank key, or one with
    characters an HTTP header cannot carry, is a usage error."""
    if api_key is None:
        return None
    key = api_key.strip()
    if not key:
        raise UsageError("--api-key is empty" if not api_key else "--api-key is only whitespace")
    if not all(" " <= c <= "~" for c in key):
        raise UsageError("--api-key must be printable ASCII (an HTTP header cannot carry the rest)")
    return key


def check_exposure(host: str, api_key: str | None, no_auth: bool) -> str | None:
    """A usage error for a non-loopback host with neither a key nor --no-auth; the warning to print
    (or None) otherwise."""
    api_key = clean_api_key(api_key)
    if api_key and no_auth:
        raise UsageError("give either --api-key or --no-auth, not both")
    if is_loopback(host):
        return None
    if api_key:
        return None
    if not no_auth:
        raise UsageError(f"--host {host} is reachable from other machines: give --api-key KEY (or set DFLASH_API_KEY), "
                         "or --no-auth to serve without one")
    return (f"warning: serving on {host} without an API key (--no-auth): anyone who can reach this port can use "
            "the model")


def bearer_ok(header: str | None, api_key: str) -> bool:
    """`Authorization: Bearer KEY`, compared in constant time (no timing hint about the key)."""
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode(), api_key.strip().encode())


# ---- the Host header -------------------------------------------------------------------------------
# A page on attacker.example whose DNS name is rebound to 127.0.0.1 reaches a loopback server as a
# "same-origin" request: only the Host header (attacker.example) gives it away. So, as ollama does,
# a request must name this server: a loopback name or address, the address it listens on, or a name
# given with --allow-host (a reverse proxy that forwards its own Host).

LOOPBACK_NAMES = ("localhost",)


def host_name(value: str) -> str:
    """The host part of a Host header (or of an --allow-host value): no port, no brackets, lower case,
    no trailing dot. "[::1]:8000" -> "::1", "LocalHost.:80" -> "localhost"."""
    value = value.strip()
    if value.startswith("["):
        name = value[1:].partition("]")[0]
    elif value.count(":") == 1:
        name = value.partition(":")[0]
    else:
        name = value  # a bare name, or a bare IPv6 address
    return name.lower().rstrip(".")


def _ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


class HostPolicy:
    """Which Host headers this server answers. `bound`: the --host given and the address it listens
    on; `extra`: the --allow-host names ("*" allows any Host)."""

    def __init__(self, bound: tuple[str, ...], extra: tuple[str, ...] = ()):
        self.any = "*" in extra
        self.names = {host_name(h) for h in (*bound, *extra) if h and h != "*"} | set(LOOPBACK_NAMES)
        # Listening on every address (0.0.0.0, ::): clients on the network name it by any of its
        # addresses. An IP literal cannot be rebound (the browser connects to that very address), so
        # every IP literal is allowed there; names still need --allow-host.
        self.any_ip = any((ip := _ip(host_name(h))) is not None and ip.is_unspecified for h in bound)

    def allows(self, header: str | None) -> bool:
        if self.any:
            return True
        if not header:
            return False  # HTTP/1.1 requires it; no browser omits it
        name = host_name(header)
        if name in self.names:
            return True
        ip = _ip(name)
        return ip is not None and (ip.is_loopback or self.any_ip)


def check_allow_host(values: tuple[str, ...]) -> tuple[str, ...]:
    """--allow-host values: host names (a port is ignored), IP addresses, or "*" for any."""
    for v in values:
        if v == "*":
            continue
        name = host_name(v)
        if not name or "/" in v or any(c.isspace() for c in v) or not all(c.isalnum() or c in "-._:" for c in name):
            raise UsageError(f"--allow-host takes a host name such as api.example.com (or *), got {v!r}")
    return values
