"""Engine and session factory; SQLite gets WAL and a busy timeout so SCP threads and the worker share it."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from synthesis.errors import Mr2ctError

log = logging.getLogger(__name__)


class DatabaseUnavailable(Mr2ctError):
    pass


# PostgreSQL SQLSTATEs of a server that cannot take writes now: read_only_sql_transaction,
# admin_shutdown, crash_shutdown, cannot_connect_now (starting up, or recovering)
SERVER_NOT_WRITABLE = frozenset({"25006", "57P01", "57P02", "57P03"})
# PostgreSQL SQLSTATEs of a transaction rolled back by a conflict with another (serialization_failure,
# deadlock_detected): the driver calls them operational errors, so they are waited out as outages
# are (cannot_reach), but a background loop says what they are (PassErrors).
WRITE_CONFLICT = frozenset({"40001", "40P01"})


def sqlstate(exc: BaseException) -> str | None:
    """The PostgreSQL SQLSTATE of a driver error (psycopg's ``sqlstate``, psycopg2's ``pgcode``),
    itself or wrapped by SQLAlchemy; None for any other error."""
    original = getattr(exc, "orig", None) or exc
    return getattr(original, "sqlstate", None) or getattr(original, "pgcode", None)


def make_engine(url: str) -> Engine:
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise DatabaseUnavailable(f"database_url {url!r} is not a valid SQLAlchemy URL: {exc}") from exc
    # hide_parameters: a statement's parameters (patient IDs among them) are never written into an
    # error's text, which a log line or an answer may carry (until 2026-12-07 a failed statement's
    # text held them, and the background loops logged it whole).
    kwargs: dict[str, Any] = {"hide_parameters": True}
    if parsed.get_backend_name() != "sqlite":  # a pooled connection a server restart closed is replaced, not used
        kwargs["pool_pre_ping"] = True
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            try:
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise DatabaseUnavailable(f"cannot open database {url}: its folder cannot be made ({exc.strerror}: {exc.filename})") from exc
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    engine = create_engine(url, **kwargs)
    if parsed.get_backend_name() == "sqlite":

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a power cut may lose the last commits, never corrupt. That is safe
            # here because the spool (fsynced before Success) is the truth and start-up recovery
            # records any spooled instance the database lost.
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

    else:

        @event.listens_for(engine, "handle_error")
        def _server_not_writable(context: Any) -> None:
            # A server that takes connections but not writes (a demoted primary or a standby that a
            # failover left the URL pointing at: "cannot execute INSERT in a read-only transaction"),
            # or one shutting down: the connection is dropped, and the pool's with it, so the next
            # attempt connects again (to the new primary, where the URL or its target_session_attrs
            # leads), and the error reads as an outage to wait out (cannot_reach), not as a row the
            # database refuses. Until 2026-12-07 night every instance received meanwhile was held as
            # unrecordable (kept in the spool until the next start) and every journal entry set aside.
            if sqlstate(context.original_exception) in SERVER_NOT_WRITABLE:
                context.is_disconnect = True

    return engine


def read_only(connection: Connection | Session) -> bool:
    """Whether the server behind ``connection`` (a SQLAlchemy Connection or Session) answers but takes no
    writes: a PostgreSQL standby, or a primary a failover demoted (/health, `mr2ct config check`)."""
    dialect = connection.dialect if isinstance(connection, Connection) else connection.get_bind().dialect
    return dialect.name == "postgresql" and connection.scalar(text("SELECT current_setting('transaction_read_only')")) == "on"


MIGRATIONS = Path(__file__).resolve().parent / "migrations"
_factories: dict[str, sessionmaker[Session]] = {}
_migrate_lock = threading.Lock()


def alembic_config(url: str) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def migrate(engine: Engine, url: str) -> None:
    """Bring the schema to the newest Alembic revision (every table came from a migration). What
    changed is one log line (created, or upgraded from which revision to which); Alembic's own line
    per migration the CLI shows only with ``--verbose`` (dicom_node.cli._logging)."""
    from alembic import command
    from alembic.runtime.migration import MigrationContext

    config = alembic_config(url)
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":  # several processes may start at once: one migrates
            connection.exec_driver_sql("SELECT pg_advisory_xact_lock(4242001)")
        before = MigrationContext.configure(connection).get_current_revision()
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
        after = MigrationContext.configure(connection).get_current_revision()
    if after != before:
        shown = make_url(url).render_as_string(hide_password=True)
        if before is None:
            log.info("database %s: schema created at revision %s", shown, after)
        else:
            log.info("database %s: schema upgraded from revision %s to %s", shown, before, after)


def init_db(url: str) -> sessionmaker[Session]:
    """Migrate the schema to head and return the session factory: both once per process and URL
    (callers may ask again and again; they share one engine and its pool). A clear error names the
    URL (password hidden)."""
    with _migrate_lock:
        if url in _factories:
            return _factories[url]
        engine = make_engine(url)
        try:
            migrate(engine, url)
        except (OperationalError, ModuleNotFoundError) as exc:
            engine.dispose()
            shown = make_url(url).render_as_string(hide_password=True)
            raise DatabaseUnavailable(f"cannot open database {shown}: {getattr(exc, 'orig', exc)}") from exc
        _factories[url] = sessionmaker(engine, expire_on_commit=False)
        return _factories[url]


def close_engines() -> None:
    """Close every pooled connection this process opened (PostgreSQL sees each session end, SQLite
    folds its write-ahead log back): for a process about to leave without the interpreter's teardown."""
    with _migrate_lock:
        for factory in _factories.values():
            factory.kw["bind"].dispose()


# What SQLite says of a database it cannot use for now; its OperationalError also names statements
# that are wrong ("no such table", a syntax error), which are no outage.
SQLITE_UNAVAILABLE = ("database is locked", "database table is locked", "unable to open database", "disk i/o error",
                      "readonly database", "database or disk is full")


def cannot_reach(exc: BaseException) -> bool:
    """Whether ``exc`` says the database cannot be reached or used for now (stopped, restarting,
    failing over, a lost connection, a locked or unwritable SQLite file): an outage to wait out,
    not a statement that is wrong."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if not isinstance(exc, (OperationalError, InterfaceError)):
        return False
    if isinstance(getattr(exc, "orig", None), sqlite3.Error):
        return any(words in str(exc.orig).lower() for words in SQLITE_UNAVAILABLE)
    return True


def driver_message(exc: BaseException) -> str:
    """The error's type and the driver's own message (its first line): SQLAlchemy's text adds the
    statement, which a log line needs no more than once."""
    lines = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


OUTAGE_REMINDER_SECONDS = 60.0


def unavailable_words(exc: BaseException) -> tuple[str, str]:
    """What an outage ``exc`` says of the database, as an outage begins and while it lasts: one that
    cannot be reached, one that answers but takes no writes (a failover's demoted primary or a
    standby), one shutting down or starting. (Until 2026-12-08 all three read "cannot be reached".)"""
    state = sqlstate(exc)
    if state == "25006":
        return "takes no writes (read-only: a standby, or a primary a failover demoted?)", "still takes no writes"
    if state in SERVER_NOT_WRITABLE:
        return "is shutting down or starting", "is still shutting down or starting"
    return "cannot be reached", "still cannot be reached"


class PassErrors:
    """How a background loop (the stability monitor, the job claim, the notes, routing, retention)
    reports a failed pass. A database that cannot be reached is one line when the outage begins
    (the driver's message, no traceback), a reminder every ``OUTAGE_REMINDER_SECONDS`` while it
    lasts and a line when a pass succeeds again; any other error is logged whole each time, as
    ``what`` (a defect to see). Until 2026-12-07 every loop logged its traceback at every pass: a
    PostgreSQL restarted for 40 s wrote 23,000 lines into the node's log."""

    def __init__(self, logger: logging.Logger, loop: str, what: str) -> None:
        self.logger, self.loop, self.what = logger, loop, what
        self.down_since: float | None = None
        self.said_at = 0.0
        self.passes = 0

    def failed(self, exc: BaseException) -> None:
        if not cannot_reach(exc):
            self.logger.error("%s", self.what, exc_info=exc)
            return
        if sqlstate(exc) in WRITE_CONFLICT and self.down_since is None:  # another transaction's, not an outage: the next pass goes on
            self.logger.warning("%s: a write conflict with another process rolled this pass back (%s); trying again", self.loop,
                                driver_message(exc))
            return
        now = time.monotonic()
        self.passes += 1
        begins, lasts = unavailable_words(exc)
        if self.down_since is None:
            self.down_since, self.said_at = now, now
            self.logger.error("%s: the database %s (%s); trying again", self.loop, begins, driver_message(exc))
        elif now - self.said_at >= OUTAGE_REMINDER_SECONDS:
            self.said_at = now
            self.logger.error("%s: the database %s after %.0f s, %d passes (%s)", self.loop, lasts, now - self.down_since,
                              self.passes, driver_message(exc))

    def succeeded(self) -> None:
        if self.down_since is not None:
            self.logger.info("%s: the database answers again after %.0f s", self.loop, time.monotonic() - self.down_since)
            self.down_since, self.passes = None, 0

    def attempt(self, step: Callable[[], object]) -> bool:
        """Run one pass of the loop; its exception reported as ``failed`` says, not raised. Whether it ran through."""
        try:
            step()
        except Exception as exc:
            self.failed(exc)
            return False
        self.succeeded()
        return True


JOBS_CHANNEL = "mr2ct_jobs"
_job_listeners: set[threading.Event] = set()


def wake_on_job_queued(wake: threading.Event) -> None:
    """Set ``wake`` whenever this process queues a job (after the commit that makes it visible);
    ``stop_waking`` ends it."""
    _job_listeners.add(wake)


def stop_waking(wake: threading.Event) -> None:
    _job_listeners.discard(wake)


def _wake_job_listeners(_session: Session) -> None:
    for wake in list(_job_listeners):
        wake.set()


def notify_job_queued(session: Session) -> None:
    """Call in the transaction that queues a job: once it commits, this process's waiting workers
    wake (``wake_on_job_queued``), and on PostgreSQL so do worker processes listening on
    ``JOBS_CHANNEL`` (elsewhere the others find it at their next poll)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text(f"NOTIFY {JOBS_CHANNEL}"))
    event.listen(session, "after_commit", _wake_job_listeners, once=True)


def listen_for_jobs(url: str, wake: threading.Event, stop: threading.Event, reconnect_seconds: float = 5.0) -> None:
    """Until ``stop``: set ``wake`` whenever a job is queued by any process (PostgreSQL LISTEN).
    A lost connection is retried; meanwhile the worker's polling still finds every job."""
    import psycopg

    conninfo = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    unavailable_since: float | None = None  # said once an outage, and once when it ends
    while not stop.is_set():
        try:
            with psycopg.connect(conninfo, autocommit=True, connect_timeout=10) as conn:
                conn.execute(f"LISTEN {JOBS_CHANNEL}")
                wake.set()  # catch up with whatever was queued while nobody listened
                if unavailable_since is not None:
                    log.info("job notifications back after %.0f s", time.monotonic() - unavailable_since)
                    unavailable_since = None
                while not stop.is_set():
                    for _ in conn.notifies(timeout=1.0):
                        wake.set()
        except Exception as exc:  # the database is away: poll meanwhile
            if unavailable_since is None:
                unavailable_since = time.monotonic()
                log.warning("job notifications unavailable, polling only for now: %s", type(exc).__name__)
            stop.wait(reconnect_seconds)
