"""The former name of data/make_shards.py, kept so that existing commands and job scripts still run."""

import sys

from data.make_shards import main

if __name__ == "__main__":
    sys.exit(main())
