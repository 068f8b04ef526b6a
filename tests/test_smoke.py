from django.db import connection


def test_default_connection_is_verified_tls(db):
    info = connection.tls_info
    assert info.transport == "tls"
    with connection.cursor() as cur:
        cur.execute(
            "select ssl, version, cipher, bits from pg_stat_ssl where pid = pg_backend_pid()"
        )
        ssl, version, cipher, bits = cur.fetchone()
    assert ssl is True
    assert (info.protocol, info.cipher, info.key_bits) == (version, cipher, bits)
