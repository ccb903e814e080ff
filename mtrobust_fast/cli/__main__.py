"""``python -m mtrobust_fast.cli ...`` (what ``torchrun -m`` launches) is the ``mtrobust-fast`` command."""
import sys

from mtrobust_fast.cli import main

sys.exit(main())
