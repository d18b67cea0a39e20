"""``python -m adalora_deploy.cli``: the command line (as ``torchrun -m adalora_deploy.cli train ...`` needs)."""

import sys

from adalora_deploy.cli import main

sys.exit(main())
