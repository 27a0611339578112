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


def check_exposure(host: str, api_key: str | None, no_auth: bool) -> str | None:
    """A usage error for a non-loopback host with neither a key nor --no-auth; the warning to print
    (or None) otherwise."""
    if api_key is not None and not api_key:
        raise UsageError("--api-key is empty")
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
    return hmac.compare_digest(token.strip().encode(), api_key.encode())
