"""A stand-in training process for the launcher tests: python tests/launch_worker.py MODE DIR.

Every start writes its pid to DIR/pids/<attempt>-<process_id> so a test can check that no
process is left. MODE says what the group does:

  fail_once   process 1 fails (exit 1) while the others wait; after that (marker DIR/failed)
              every process exits 0.
  always_fail process 1 fails (exit 1) at every start while the others wait.
  bad_input   process 1 exits 2 while the others wait.
  sleep       every process sleeps (to be stopped).
  stubborn    like sleep, but process 1 ignores SIGTERM.
"""

import os
import signal
import sys
import time


def main() -> int:
    mode, workdir = sys.argv[1], sys.argv[2]
    pid_dir = os.path.join(workdir, "pids")
    os.makedirs(pid_dir, exist_ok=True)
    process_id = int(os.environ["JAXDML_PROCESS_ID"])
    attempt = int(os.environ["JAXDML_ATTEMPT"])
    with open(os.path.join(pid_dir, f"{attempt}-{process_id}"), "w") as f:
        f.write(str(os.getpid()))
    print(f"hello from process {process_id} of {os.environ['JAXDML_NUM_PROCESSES']}", flush=True)
    print(f"devices {os.environ.get('JAXDML_NUM_CPU_DEVICES')}", flush=True)
    with open("/proc/self/cmdline", "rb") as f:  # a woken standby runs under jaxdml.standby
        how = "warm" if b"jaxdml.standby" in f.read() else "cold"
    print(f"attempt {attempt} {how}", flush=True)
    marker = os.path.join(workdir, "failed")
    fails = {"fail_once": not os.path.exists(marker), "always_fail": True, "bad_input": True}
    if fails.get(mode, False):
        if process_id != 1:
            time.sleep(120)  # a survivor: the launcher stops it
            return 0
        time.sleep(0.3)
        open(marker, "w").close()
        print("failing now", flush=True)
        return 2 if mode == "bad_input" else 1
    if mode == "stubborn" and process_id == 1:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if mode in ("sleep", "stubborn"):
        time.sleep(120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
