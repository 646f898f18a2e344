"""`python -m convert SRC DST [...]`, the same as `jaxvlm-convert`."""

import sys

from convert.cli import main

sys.exit(main())
