"""`python -m planner [stage=N] [overrides] [+gpus=8] [+gpu_memory_gb=80]`: the memory plan (planner/plan.py)."""

import sys

from planner.plan import main

sys.exit(main())
