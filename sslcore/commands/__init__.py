"""The ``sslcore`` command and its subcommands: run, validate, plugins, schema, export, eval, report."""
