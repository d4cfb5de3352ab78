"""Keyed identities: what a store (and a log line) holds instead of an address.

With an `identity_key`, no store key, index member, HyperLogLog element or feed message
carries an address: each carries a *token*, a keyed hash (HMAC-SHA-256, truncated to 128
bits, base64url) of the identity. Without the key nobody can turn a token back into an
address or test a guess (a copy of Redis, a backup, a stolen replica reveals nothing
searchable); with it, the same identity always gives the same token, in every process.
Client fingerprints are keyed the same way (the unkeyed one, a hash of HELO name and
sender domain, could be reversed by guessing common domains).

Subkeys are derived from the operator's key with HKDF-SHA-256 (RFC 5869), one per use,
so a token key never doubles as an encryption key. Stdlib only: this module is part of
the contract (the same tokens in every component that computes them).
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
from functools import lru_cache

TOKEN_BYTES = 16  # 128 bits: no collision among any number of identities a fleet sees
FINGERPRINT_BYTES = 8


def hkdf(key: bytes, info: bytes, length: int = 32) -> bytes:
    """HKDF-SHA-256 with an empty salt (RFC 5869): a subkey of `key` for `info`."""
    prk = hmac.new(b"\0" * 32, key, hashlib.sha256).digest()
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


_URLSAFE = bytes.maketrans(b"+/", b"-_")


def _b64(raw: bytes) -> str:
    """base64url without padding, in C (binascii): a token is made for every address seen
    for the first time, and the stdlib's pure-Python base32 cost 15x as much."""
    return binascii.b2a_base64(raw, newline=False).rstrip(b"=").translate(_URLSAFE).decode()


class IdentityKey:
    """Tokens of identities and fingerprints under one operator key."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("identity_key must be at least 16 bytes (128 bits)")
        self._identity = hkdf(secret, b"penaltyd identity token v1")
        self._fingerprint = hkdf(secret, b"penaltyd fingerprint token v1")
        self.seal_key = hkdf(secret, b"penaltyd seal v1", 64)  # AES-256-SIV
        self._log_secret = _b64(hkdf(secret, b"penaltyd log secret v1")).encode()
        self.token = lru_cache(maxsize=131072)(self._token)
        self.fingerprint = lru_cache(maxsize=131072)(self._fp)

    def _token(self, identity: str) -> str:
        """`k` + base64url of the keyed hash: 23 characters, never an address."""
        digest = hmac.digest(self._identity, identity.encode(), "sha256")
        return "k" + _b64(digest[:TOKEN_BYTES])

    def _fp(self, fingerprint: str) -> str:
        if not fingerprint:
            return ""
        digest = hmac.digest(self._fingerprint, fingerprint.encode(), "sha256")
        return _b64(digest[:FINGERPRINT_BYTES])

    @property
    def log_secret(self) -> bytes:
        """The secret of this key's log tokens, for the programs that log beside penaltyd
        (the sidecars' `--log-key-file`): one-way from the identity key, so an MX that
        holds it can join log lines but neither compute store tokens nor open seals."""
        return self._log_secret


class LogTokens:
    """Short keyed tokens for log lines (`log_addresses = "keyed"`): lines about the same
    address can be joined without the address being written. Every program with the same
    log secret (penaltyd's `IdentityKey.log_secret`) writes the same token."""

    def __init__(self, secret: bytes) -> None:
        self._key = hkdf(secret, b"penaltyd log token v1")

    def token(self, value: str) -> str:
        digest = hmac.digest(self._key, value.encode(), "sha256")
        return "~" + _b64(digest[:8])
