"""What this backend knows of hosted PostgreSQL, from each provider's own documentation.

Two things, both used only to word a message, never to decide what is trusted:

* ``by_issuer``: whose CA issued a certificate, so a refusal can name the bundle to download.
* ``transaction_pooler``: whether a host and port are a pooler that runs in transaction mode,
  so ``manage.py check`` can warn that server-side cursors (``.iterator()``) break there.

Every fact here is in docs/cloud-providers.md with its source; a provider whose facts could
not be confirmed is not here (a wrong hint is worse than none).
"""

from __future__ import annotations

__all__ = ["Provider", "by_issuer", "transaction_pooler"]


class Provider:
    """A provider's CA, recognised by its name in a certificate's issuer."""

    __slots__ = ("bundle", "issuers", "name")

    def __init__(self, name: str, issuers: tuple[str, ...], bundle: str) -> None:
        self.name = name
        self.issuers = issuers  # lower-case substrings of the issuer's distinguished name
        self.bundle = bundle  # where its CA bundle comes from

    def __repr__(self) -> str:
        return f"Provider({self.name!r})"


PROVIDERS = (
    # Amazon RDS / Aurora: CAs named "Amazon RDS <region> Root CA RSA2048 G1" (and RSA4096,
    # ECC384); one bundle holds every region's (UsingWithRDS.SSL.html).
    Provider(
        "Amazon RDS",
        ("amazon rds",),
        "https://truststore.pki.rds.amazonaws.com/global/global-bundle.pem",
    ),
)


def by_issuer(issuer: str) -> Provider | None:
    """The provider whose CA is named in ``issuer`` (an RFC 4514 string), if known."""
    lowered = issuer.lower()
    for provider in PROVIDERS:
        if any(marker in lowered for marker in provider.issuers):
            return provider
    return None


def transaction_pooler(host: str, port: str) -> str | None:
    """Which provider's transaction-mode pooler ``host:port`` is, in words, or None.

    Only what the host name and port already say: nothing is asked of the server.
    """
    name = host.lower().rstrip(".")
    if name.endswith(".pooler.supabase.com") and port == "6543":
        return "Supabase's shared pooler (Supavisor) in transaction mode"
    if name.endswith(".neon.tech") and "-pooler." in name:
        return "Neon's pooled endpoint (PgBouncer in transaction mode, a -pooler host)"
    if name.endswith(".postgres.database.azure.com") and port == "6432":
        return "Azure Database for PostgreSQL's built-in PgBouncer (default pool_mode transaction)"
    return None
