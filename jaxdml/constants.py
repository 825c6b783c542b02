"""Names shared by the library, the entry points and the launcher: exit codes, environment.

A leaf module: it imports nothing of jaxdml, so any layer may read it.
"""

VERSION = "0.1.0"

# Hook.max_fused's "any number of steps": no hook needs a fused call to end.
UNLIMITED_STEPS = 2**31 - 1

EXIT_OK = 0
EXIT_BAD_INPUT = 2  # a bad config value, flag or data file; nothing was trained
EXIT_GAVE_UP = 3  # the supervisor stopped: too few devices or recovery budget spent
EXIT_HANG = 4  # the step watchdog saw no progress: a hang turned into a crash
EXIT_INTERRUPTED = 130  # SIGINT (Ctrl-C): the step finished, a checkpoint was saved

# jaxdml.launch decides on restarts by exit status; a restart cannot fix these
# (the same input fails the same way; a Ctrl-C means stop). Status 1 is Python's
# for an uncaught exception.
NO_RESTART_EXIT_CODES = frozenset({EXIT_BAD_INPUT, EXIT_INTERRUPTED})

# The environment jaxdml.launch gives each process it starts (read by jaxdml.distributed).
ENV_COORDINATOR = "JAXDML_COORDINATOR"  # host:port of process 0's coordination service
ENV_NUM_PROCESSES = "JAXDML_NUM_PROCESSES"  # processes in the job
ENV_PROCESS_ID = "JAXDML_PROCESS_ID"  # this process, 0..N-1
ENV_NUM_CPU_DEVICES = "JAXDML_NUM_CPU_DEVICES"  # simulated CPU devices of this process
ENV_ATTEMPT = "JAXDML_ATTEMPT"  # 0 for the group's first start, k for its k-th restart
