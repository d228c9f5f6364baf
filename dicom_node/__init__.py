"""The mr2ct service: C-STORE SCP, durable spool, series stability, jobs, worker, database, audit, CLI."""

__version__ = "0.1.0"
