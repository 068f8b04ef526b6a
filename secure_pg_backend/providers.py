"""What this backend knows of hosted PostgreSQL: whose CA a certificate's issuer is, and which
host and port combinations are a transaction pooler. Each fact is from the provider's own
documentation, cited in docs/cloud-providers.md; nothing here is guessed.
"""

from __future__ import annotations

__all__ = ["Provider", "by_issuer", "transaction_pooler"]


class Provider:
    __slots__ = ("bundle", "issuers", "name")

    def __init__(self, name: str, issuers: tuple[str, ...], bundle: str) -> None:
        self.name = name
        self.issuers = issuers  # lower-case substrings of the issuer's distinguished name
        self.bundle = bundle  # where its CA bundle comes from


PROVIDERS: tuple[Provider, ...] = ()


def by_issuer(issuer: str) -> Provider | None:
    lowered = issuer.lower()
    for provider in PROVIDERS:
        if any(marker in lowered for marker in provider.issuers):
            return provider
    return None


def transaction_pooler(host: str, port: str) -> str | None:
    return None
