"""`python -m headsteer.bench ...`: the same as `headsteer bench ...`."""
import sys

from headsteer.bench.harness import main

if __name__ == "__main__":
    sys.exit(main())
