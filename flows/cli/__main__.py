"""`python -m flows.cli …`: the same app as the `nightread` script."""

from flows.cli import app

app(prog_name="nightread")
