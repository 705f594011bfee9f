"""`python -m mlxk.workers`: the job worker (the `worker` process of the Procfile, also started by the CLI)."""
import sys

from mlxk.workers.consumer import main

sys.exit(main())
