"""Run PgQueuer's worker in drain mode, as `pgq run pgq_app:main --mode drain` would.

Its CLI's `run` fails in pgqueuer 1.6.0 with typer 0.29 (the --log-level option reaches the
code as a str: AttributeError 'str' object has no attribute 'name'), so this calls the same
`pgqueuer.run` entry point the CLI calls, with the CLI's defaults (batch size 10).
"""

import asyncio
import logging

import pgqueuer
from pgqueuer import types

logging.basicConfig(level=logging.WARNING)
asyncio.run(pgqueuer.run("pgq_app:main", mode=types.QueueExecutionMode.drain, batch_size=10))
