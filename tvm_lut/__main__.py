"""``python -m tvm_lut``: the ``tvm-lut`` command line."""

import sys

from tvm_lut.app.cli import main

sys.exit(main())
