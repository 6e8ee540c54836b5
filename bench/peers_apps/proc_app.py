"""procrastinate: one no-op task on a psycopg connector."""

import os

from procrastinate import App, PsycopgConnector

app = App(connector=PsycopgConnector(conninfo=os.environ["PEER_DSN"]))


@app.task(name="noop")
def noop() -> None:
    pass
