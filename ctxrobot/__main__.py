"""`python -m ctxrobot`: the command line, as the `ctxrobot` console script runs it."""

import sys

from ctxrobot.cli.main import main

sys.exit(main())
