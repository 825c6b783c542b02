"""One of two processes of a recoverable job whose process 1 dies at a chosen moment:
python tests/pulse_worker.py MODE DIR (JAXDML_* environment as set by jaxdml.launch).

  barrier  both meet at a first Pulse barrier; process 1 then SIGKILLs itself and
           process 0 waits at a second one.
  save     both start an async Orbax save; process 1 SIGKILLs itself as soon as its save
           call returns and process 0 waits for the save to finish.

Process 0 writes DIR/result.json: what ended its wait, after how many seconds.
"""

import json
import os
import signal
import sys
import time

from configs import sgd_logreg
from jaxdml import distributed


def main() -> None:
    mode, workdir = sys.argv[1], sys.argv[2]
    config = sgd_logreg.get_config()
    config.distributed.heartbeat_timeout_secs = 3
    config.distributed.collective_timeout_secs = 5
    distributed.initialize(config)
    me = distributed.process_index()
    pulse = distributed.pulse()
    pulse.barrier("first", 60, [0, 1])
    if mode == "barrier":
        if me == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        start = time.monotonic()
        try:
            pulse.barrier("second", 600, [0, 1])
            ended = "passed"
        except Exception as e:  # noqa: BLE001 -- the test reads what it was
            ended = f"{type(e).__name__}: {e}"
        result = {"ended": ended, "seconds": time.monotonic() - start}
    else:
        import numpy as np

        from jaxdml.checkpoint import Checkpointer

        checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"))
        checkpointer.save(1, {"w": np.ones((1000,), np.float32)}, {})
        if me == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        start = time.monotonic()
        checkpointer.wait()
        result = {"failed_saves": checkpointer.failed_saves, "seconds": time.monotonic() - start}
    with open(os.path.join(workdir, "result.json"), "w") as f:
        json.dump(result, f)
    os._exit(0)  # the job cannot shut down in order without process 1


if __name__ == "__main__":
    main()
