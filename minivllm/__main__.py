"""``python -m minivllm`` = the ``minivllm`` console script."""

import sys

from minivllm.entrypoints.cli import main

sys.exit(main())
