"""`python -m torch_tpu_estimator inspect PATH` (see cli.py)."""

import sys

from .cli.main import main

sys.exit(main())
