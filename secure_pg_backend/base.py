"""The DatabaseWrapper: Django's PostgreSQL backend with the TLS policy enforced.

``VerifiedTLSMixin`` judges the settings (``policy``) and opens every physical connection
through the attempt pipeline (``pipeline``), which judges the exact parameters libpq gets and
checks the live link. Forks and exits: ``lifecycle``.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NoReturn

from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed
from django.db.backends.base.base import NO_DB_ALIAS
from django.db.backends.postgresql import base as postgresql

from . import libpq, lifecycle, pipeline, policy, signals
from .aliases import standalone_wrapper
from .client import DatabaseClient
from .errors import ConnectionFileError, InsecureConnectionError, SecurePolicyError, secret_values
from .lifecycle import EXIT_GRACE, after_fork_in_child
from .validation import DatabaseValidation

if TYPE_CHECKING:  # imported when first built: a cold start that inspects nothing skips it
    from .tlsinfo import TLSInfo

__all__ = [
    "EXIT_GRACE",
    "DatabaseWrapper",
    "VerifiedTLSMixin",
    "after_fork_in_child",
    "standalone_wrapper",
    "verified_aliases",
]


def verified_aliases() -> list[str]:
    """The aliases whose wrapper carries the policy: by class (mixins too), not ENGINE name."""
    from django.db import connections

    aliases = []
    for alias in connections:
        try:
            wrapper = connections[alias]
        except ImproperlyConfigured:  # an ENGINE that does not load: Django reports it
            continue
        if isinstance(wrapper, VerifiedTLSMixin) and not wrapper.misassembled:
            aliases.append(alias)
    return aliases


if TYPE_CHECKING:  # the mixin is only ever combined with a postgresql wrapper
    _WrapperBase = postgresql.DatabaseWrapper
else:
    _WrapperBase = object


_CONTAINERS = itertools.repeat((dict, list, set, bytearray))
# Set on a psycopg connection by ``_settle``: its autocommit mode, for the set_autocommit
# Django's connect() asks next.
_SETTLED = "_secure_pg_backend_settled"


# How many times Django announced a new USE_TZ (``setting_changed``: override_settings,
# pytest-django's settings fixture), the way the connections' own time zone follows it: a
# verdict made since the last one needs no read of the setting (a Python-level attribute of
# Django's lazy settings) to know its adapters still match.
_use_tz_changes = 0


def _count_use_tz_change(*, setting: str, **kwargs: Any) -> None:
    global _use_tz_changes
    if setting == "USE_TZ":
        _use_tz_changes += 1


setting_changed.connect(_count_use_tz_change, dispatch_uid="secure_pg_backend.use_tz")


class _Inputs:
    """What a verdict was made from, or nothing when it depends on a file's contents (a
    service): ``unchanged`` tells whether the verdict still holds.

    The verdict is about configuration only: whether the files libpq opens are usable is
    checked again before every physical connection (``check_files``). What Django's
    ``get_connection_params`` reads besides the settings dict is here too: USE_TZ and the
    connection's time zone choose its adapters (``context``, which a test's
    ``override_settings`` changes), so a new one is a new verdict, not a stale one. Kept as
    copies and compared, not hashed, so a new connection pays C-level comparisons only.
    """

    __slots__ = ("built", "environment", "nested", "settings", "timezone", "use_tz_changes")

    def __init__(
        self,
        settings_dict: Mapping[str, Any],
        environment: libpq.EnvironmentWatch,
        timezone: Any,
        built: Mapping[str, Any] | None,
    ) -> None:
        options = settings_dict.get("OPTIONS")
        # The settings as they are now: OPTIONS copied too, so an option set in place is a
        # difference; and as text when an option holds a container, which could change in
        # place under the same items.
        self.settings = dict(settings_dict)
        self.nested = None
        if isinstance(options, dict):
            self.settings["OPTIONS"] = dict(options)
            if any(map(isinstance, options.values(), _CONTAINERS)):
                self.nested = repr(options)
        self.environment = environment
        self.use_tz_changes = _use_tz_changes  # read before USE_TZ itself (``of``)
        self.timezone = timezone
        # What a class below the mixin built, when one does (copied: the judgment reads it).
        self.built = None if built is None else dict(built)

    @classmethod
    def of(cls, wrapper: Any, built: Mapping[str, Any] | None) -> _Inputs | None:
        environment = libpq.EnvironmentWatch()
        options = wrapper.settings_dict.get("OPTIONS") or {}
        # A service, in OPTIONS or in PGSERVICE (set, even empty).
        if "service" in options or environment.snapshot[libpq.SERVICE_AT] is not None:
            return None
        return cls(wrapper.settings_dict, environment, wrapper.timezone, built)

    def unchanged(self, wrapper: Any, built: Mapping[str, Any] | None) -> bool:
        settings_dict = wrapper.settings_dict
        return (
            settings_dict == self.settings
            and (self.nested is None or repr(settings_dict.get("OPTIONS")) == self.nested)
            and built == self.built
            and self.use_tz_changes == _use_tz_changes
            and wrapper.timezone == self.timezone
            and self.environment.unchanged()
        )


class VerifiedTLSMixin(_WrapperBase):
    """The whole TLS policy, on top of any wrapper derived from Django's postgresql one.

    Put it first: ``class DatabaseWrapper(VerifiedTLSMixin, other.DatabaseWrapper)``.
    """

    client_class = DatabaseClient
    validation_class = DatabaseValidation
    # psycopg as Django's get_new_connection calls it: the final parameters judged first.
    Database = pipeline.JudgingDatabase()

    _decision: policy.Decision | None = None
    _plan_cache: pipeline.Plan | None = None
    # Methods below the mixin that can change the parameters libpq gets (named in a refusal).
    _param_changers: tuple[str, ...] = ()
    # Why this class never reaches the policy (Django's wrapper ahead of the mixin), or "".
    misassembled = ""
    # A class between the mixin and Django's wrapper builds the parameters (an IAM token per
    # call, say): its result is part of every verdict's key, so it is asked on every connect.
    _params_below = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        mro = cls.__mro__
        django = postgresql.DatabaseWrapper
        here = mro.index(VerifiedTLSMixin)
        if django in mro and mro.index(django) < here:
            cls.misassembled = misassembly(cls)
            # Django's methods would open connections without the policy: refuse instead, at
            # the first connection (a class is often created at import, before checks run).
            cls.get_connection_params = _refuse_misassembled  # type: ignore[method-assign]
            cls.get_new_connection = _refuse_misassembled  # type: ignore[method-assign]
            return
        stock = set(django.__mro__)
        cls._param_changers = tuple(
            f"{_class_name(klass)}.{name}"
            for klass in mro
            if klass is not VerifiedTLSMixin and klass not in stock
            for name in ("get_connection_params", "get_new_connection")
            if name in vars(klass)
        )
        cls._params_below = any(
            "get_connection_params" in vars(klass)
            for klass in mro[here + 1 :]
            if klass not in stock
        )

    _verdict: policy.Verdict | None = None
    _inputs: _Inputs | None = None
    _connection_pools: dict[str, Any]  # Django's class-level registry (not in the stubs)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        lifecycle.track_wrapper(self)  # so a forked child can make it forget its connection

    # -- settings -> libpq parameters, before any network I/O ------------------
    def get_connection_params(self) -> dict[str, Any]:
        verdict = self.policy_verdict()
        if verdict.decision is None or verdict.params is None:
            error: Exception
            if verdict.violations:  # the configuration: found without I/O
                error = SecurePolicyError(
                    self.alias, verdict.host, verdict.violations, secret_values(self.settings_dict)
                )
            else:  # a named service's file, looked at before libpq reads it
                error = ConnectionFileError.from_violations(
                    self.alias, verdict.host, verdict.file_violations
                )
            signals.connection_refused.send(type(self), alias=self.alias, error=error)
            raise error
        self._decision = verdict.decision
        return dict(verdict.params)

    def policy_verdict(self) -> policy.Verdict:
        """Judge the current settings without I/O: the gate, the checks and dbshell use it.

        Django's ``get_connection_params`` is a function of the inputs ``_Inputs`` keeps (the
        settings dict, USE_TZ, the connection's time zone), so while none changed its result
        is the one the verdict was made from and is not built again; a class between the
        mixin and Django's wrapper is asked every time (``_params_below``).
        """
        built = self._django_connection_params() if type(self)._params_below else None
        inputs, verdict = self._inputs, self._verdict
        if inputs is not None and verdict is not None and inputs.unchanged(self, built):
            return verdict
        inputs = _Inputs.of(self, built)  # before the judgment: a later change is seen
        params = built if built is not None else self._django_connection_params()
        verdict = policy.judge(self.alias, self.settings_dict, params)
        self._verdict, self._inputs = verdict, inputs
        return verdict

    def _django_connection_params(self) -> dict[str, Any]:
        original = self.settings_dict
        if original.get("NAME") is not None:
            return dict(super().get_connection_params())
        # Django's method edits OPTIONS in place when NAME is None (it drops "service", as on
        # the no-database path); hand it a copy so the alias's settings stay intact.
        self.settings_dict = {**original, "OPTIONS": dict(original.get("OPTIONS") or {})}
        try:
            params = dict(super().get_connection_params())
        finally:
            self.settings_dict = original
        service = (original.get("OPTIONS") or {}).get("service")
        if service:
            # Beyond stock: without its service a service-only configuration would fall to
            # the local socket (refused). Keep it (its host, port, TLS settings, judged as
            # usual); Django's dbname 'postgres' stays explicit and outranks the service's.
            params["service"] = service
        return params

    # -- every physical connection: the attempt pipeline ----------------------------------
    def get_new_connection(self, conn_params: dict[str, Any]) -> Any:
        try:
            if self.pool is not None:  # the pool's connection class runs the pipeline
                connection = super().get_new_connection(conn_params)
            else:
                open_ = super().get_new_connection  # ends in Database.connect: judged there
                # Opened in autocommit, as Django's pool opens its connections: the session
                # setup (``_settle``) runs as stock runs it, without switching psycopg's mode
                # there and back; Django sets the alias's AUTOCOMMIT right after, as it does.
                params = {"autocommit": True, **conn_params}
                connection = pipeline.connect(self._plan(), params, open_, self._settle)
        except Exception as exc:
            refusal = self._explain(exc)
            if refusal is None:
                raise  # transient or not ours: exactly what stock raises
            signals.connection_refused.send(type(self), alias=self.alias, error=refusal)
            if refusal is exc:
                raise
            raise refusal from exc
        return connection

    def _settle(self, connection: Any) -> None:
        """The first statement of Django's session setup, its time zone, inside the attempt
        (``pipeline.connect``: PgBouncer's "not now" to it is retried like a connect's); Django's
        own call in ``init_connection_state`` then finds it set and sends nothing. The role
        (``assume_role``) stays Django's: its SQL is composed through this wrapper's cursor,
        which needs ``self.connection`` set. In autocommit, as Django runs it: in a transaction
        psycopg would add a BEGIN and a COMMIT that stock does not send (the connection is
        opened in autocommit unless OPTIONS say otherwise)."""
        was = connection.autocommit
        if not self._time_zone_is_set(connection):
            if not was:
                connection.autocommit = True  # a client-side switch while idle: nothing is sent
            # Django's statement, as its _configure_timezone sends it.
            with connection.cursor() as cursor:
                cursor.execute(self.ops.set_time_zone_sql(), [self.timezone_name])
            # Not in a finally: PgBouncer's "not now" closes the connection, and restoring the
            # switch on it would raise "the connection is lost" in place of the "not now" the
            # retry recognises.
            if not was:
                connection.autocommit = was
        # Left idle, outside a pipeline, in this mode: what set_autocommit is asked next.
        setattr(connection, _SETTLED, was)

    def _time_zone_is_set(self, connection: Any) -> bool:
        """Django's test in ``_configure_timezone`` (true: it would send nothing), read from
        libpq without the ConnectionInfo and the decoding psycopg's ``parameter_status`` adds."""
        timezone_name = self.timezone_name
        return not timezone_name or (
            connection.pgconn.parameter_status(b"TimeZone") == timezone_name.encode()
        )

    # Django's connect() asks set_autocommit(AUTOCOMMIT) and init_connection_state's
    # _configure_timezone right after get_new_connection: on the connection _settle has just
    # set up, psycopg's switch to the mode it is in (idle, outside a pipeline) changes and
    # sends nothing, and Django's time zone test is the one _settle made.
    def _set_autocommit(self, autocommit: bool) -> None:
        if vars(self.connection).pop(_SETTLED, None) is not autocommit:
            super()._set_autocommit(autocommit)  # type: ignore[misc]

    def _configure_timezone(self, connection: Any) -> bool:
        if self._time_zone_is_set(connection):
            return False
        return bool(super()._configure_timezone(connection))  # type: ignore[misc]

    def _plan(self) -> pipeline.Plan:
        """The pipeline's plan for the current decision (judged again if a subclass's
        ``get_connection_params`` never asked the policy)."""
        decision = self._decision
        if decision is None:
            VerifiedTLSMixin.get_connection_params(self)  # raises the policy's refusal
            decision = self._decision
            assert decision is not None
        plan = self._plan_cache
        if plan is None or plan.decision is not decision:
            plan = pipeline.Plan(
                self.alias, decision, self.settings_dict, type(self), type(self)._param_changers
            )
            self._plan_cache = plan
        return plan

    def _explain(self, exc: Exception) -> InsecureConnectionError | None:
        decision = self._decision
        host = decision.host_display if decision else self.settings_dict.get("HOST")
        params = self._verdict.params if self._verdict is not None else None
        from .refusals import explain  # a refusal's wording: imported by the first failure

        return explain(
            exc,
            self.alias,
            host,
            secret_values(self.settings_dict),
            decision=decision,
            params=params,
        )

    @property
    def tls_info(self) -> TLSInfo:
        """What this alias's current connection negotiated (connects if needed)."""
        if self.connection is None:
            self.ensure_connection()
        info: TLSInfo = pipeline.tls_info_of(self.connection)
        return info

    # -- Django's pool, with refusals reported at once -------------------------
    # Django's property builds psycopg_pool.ConnectionPool (imported inside it: no hook for the
    # class) only when the alias has none in the class-level registry, and returns what is
    # registered. So ours is registered first and Django's property does the rest: which
    # aliases pool, the refusal of CONN_MAX_AGE with a pool, what it returns.
    # tests/test_retry.py pins that contract of Django's property.
    @property
    def pool(self) -> Any:
        pool_options = self.settings_dict["OPTIONS"].get("pool")
        if not pool_options or self.alias == NO_DB_ALIAS:
            return None  # Django's answer too, asked on every cursor: kept as cheap as Django's
        if (
            self.alias not in self._connection_pools
            and self.settings_dict.get("CONN_MAX_AGE", 0) == 0
        ):
            self._connection_pools.setdefault(self.alias, self._verified_pool(pool_options))
        return super().pool

    def _verified_pool(self, pool_options: Any) -> Any:
        """The pool Django would build, with the policy's retries and prompt refusals."""
        try:
            from .pool import VerifiedConnectionPool
        except ImportError as err:
            raise ImproperlyConfigured(
                "Error loading psycopg_pool module.\n"
                "Did you install secure-pg-backend[pool] (psycopg[pool])?"
            ) from err
        pool_options = {} if pool_options is True else {**pool_options}
        connect_kwargs = self.get_connection_params()
        connect_kwargs["autocommit"] = True  # as Django's: it sets the real value later
        pool_options.setdefault(  # overridable, as from Django 6.1
            "check",
            VerifiedConnectionPool.check_connection
            if self.settings_dict["CONN_HEALTH_CHECKS"]
            else None,
        )
        return VerifiedConnectionPool(
            self._plan(),
            kwargs=connect_kwargs,
            open=False,  # as Django's: opened on first use, not at start-up
            configure=self._configure_connection,  # type: ignore[attr-defined]
            explain=self._explain,
            **pool_options,
        )


def _class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def misassembly(cls: type) -> str:
    """Why ``cls`` never reaches the policy: Django's wrapper precedes the mixin."""
    return (
        f"the wrapper class {_class_name(cls)} lists Django's PostgreSQL wrapper before "
        "VerifiedTLSMixin in its bases, so Django's get_connection_params and "
        "get_new_connection run instead of the policy's and no connection would be verified. "
        "Fix: put VerifiedTLSMixin first: class DatabaseWrapper(VerifiedTLSMixin, "
        "<other>.DatabaseWrapper)."
    )


def _refuse_misassembled(self: Any, *args: Any, **kwargs: Any) -> NoReturn:
    error = SecurePolicyError.misassembled(self.alias, type(self).misassembled)
    signals.connection_refused.send(type(self), alias=self.alias, error=error)
    raise error


class DatabaseWrapper(VerifiedTLSMixin, postgresql.DatabaseWrapper):
    """Django's PostgreSQL wrapper under the verified-TLS policy.

    ``display_name`` stays Django's: Django builds user-facing messages from it ("PostgreSQL 14
    or later is required", "... does not support ..."), which must read as on the stock ENGINE.
    What the link is shows in ``tls_info`` and ``manage.py dbtls``.
    """
