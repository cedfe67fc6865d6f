"""``python -m rwp_fast ...`` (and ``torchrun ... -m rwp_fast train ...``): the rwp-fast command line."""

import sys

from .cli import main

sys.exit(main())
