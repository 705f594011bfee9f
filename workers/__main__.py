"""`python -m mlxk.workers`: the job worker (the `worker` process of the Procfile, also started by the CLI).

It leaves through os._exit once the consumer has cleaned up (jobs re-queued, heartbeat and pid file removed): see
mlxk.cli.EXIT_AFTER_CLEANUP for why.
"""
from mlxk.processes import exit_now
from mlxk.workers.consumer import main

exit_now(main())
