"""Who is calling: client keys matched by their sha256, and what their team may use.

Only digests are kept in memory; a secret is hashed on arrival and then
forgotten. Lookup is by digest in a dict: the digest of an attacker's guess
reveals nothing about the stored digests, so no constant-time compare is
needed there. The admin key, a single secret, is compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from fnmatch import fnmatchcase

from .config import KeyConfig, Settings, TeamConfig
from .errors import GatewayError


def hash_key(secret: str) -> str:
    """The hex sha256 that a key entry stores for ``secret``."""
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()


def model_matches(model: str, globs: list[str] | tuple[str, ...]) -> bool:
    return any(fnmatchcase(model, glob) for glob in globs)


@dataclass(frozen=True, slots=True, eq=False)
class Caller:
    """An authenticated client: the key entry and the team it belongs to.

    One per key and config load, compared and hashed by identity, so what is
    derived from it can be cached cheaply.
    """

    key: KeyConfig
    team: TeamConfig

    @property
    def key_id(self) -> str:
        return self.key.id

    @property
    def team_name(self) -> str:
        return self.team.name

    def may_use(self, model: str) -> bool:
        return model_matches(model, self.team.models)


def bearer_secret(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, secret = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    secret = secret.strip()
    return secret or None


class KeyRing:
    """The configured keys by digest, each bound to its team."""

    def __init__(self, settings: Settings):
        teams = {team.name: team for team in settings.teams}
        self._callers = {key.sha256: Caller(key, teams[key.team]) for key in settings.keys}
        self._admin_digest = settings.admin.key_sha256

    def authenticate(self, authorization: str | None) -> Caller:
        secret = bearer_secret(authorization)
        if secret is None:
            raise GatewayError(
                401,
                "invalid_api_key",
                "No API key provided. Send it as 'Authorization: Bearer <key>'.",
            )
        caller = self._callers.get(hash_key(secret))
        if caller is None:
            raise GatewayError(401, "invalid_api_key", "Incorrect API key provided.")
        return caller

    def is_admin(self, authorization: str | None) -> bool:
        secret = bearer_secret(authorization)
        if secret is None or self._admin_digest is None:
            return False
        return hmac.compare_digest(hash_key(secret), self._admin_digest)
