"""Who may call: API keys (stored as SHA-256 digests, compared in constant time) with their roles, the key a request
presents, and the client a rate limit counts it as."""
# no `from __future__ import annotations`: Serve pickles Keys by value with the Api class

import base64
import binascii
import hashlib
import hmac
import os
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request

from bicascade.errors import BadInputError


@dataclass(frozen=True)
class Keys:
    """API keys as SHA-256 digests with their roles (`read` searches; `admin` also reads /stats and /metrics)."""

    roles: dict[bytes, str]

    @classmethod
    def read(cls, path: str | None) -> "Keys | None":
        text = Path(path).read_text() if path else os.environ.get("BICASCADE_API_KEYS", "").replace(",", "\n")
        roles = {}
        for n, line in enumerate(text.splitlines(), 1):
            parts = line.split("#", 1)[0].split()
            if not parts:
                continue
            if len(parts) > 2 or (len(parts) == 2 and parts[1] not in ("read", "admin")) or len(parts[0]) < 16:
                raise BadInputError(f"api keys line {n}: expected `KEY [read|admin]` with a key of 16+ characters")
            roles[hashlib.sha256(parts[0].encode()).digest()] = parts[1] if len(parts) == 2 else "read"
        if path and not roles:
            raise BadInputError(f"no API keys in {path}")
        return cls(roles) if roles else None

    def role(self, key: str) -> str | None:
        """The key's role, compared in constant time against every key (no early exit)."""
        digest = hashlib.sha256(key.encode()).digest()
        found = None
        for known, role in self.roles.items():
            if hmac.compare_digest(known, digest):
                found = role
        return found


def presented_key(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value:
        return value.strip()
    if scheme.lower() == "basic" and value:  # a browser's login prompt: the password is the key
        try:
            return base64.b64decode(value).decode().partition(":")[2] or None
        except (binascii.Error, UnicodeDecodeError):
            return None
    if request.url.path == "/" and request.query_params.get("key"):  # the page, opened from a link with its key
        return request.query_params["key"]
    return None


def client_of(request: Request, key: str | None) -> str:
    if key:
        return "key:" + hashlib.sha256(key.encode()).hexdigest()[:16]  # never the key itself
    return "addr:" + (request.client.host if request.client else "unknown")
