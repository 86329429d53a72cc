"""``python -m sslcore``: the ``sslcore`` command."""

import sys

from sslcore.commands.cli import main

sys.exit(main())
