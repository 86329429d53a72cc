"""The plugin API: the hook specs and the contracts of what they register (hookspecs.py, one page), and the
errors a plugin raises for the user to fix (errors.py)."""
