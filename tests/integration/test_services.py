"""The local services leave nothing behind, even when whatever started them is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

_START_AND_WAIT = """
import os, sys, time
from pathlib import Path
from tokenflow.services.object_store import ObjectStore
store = ObjectStore(Path(sys.argv[1])).start(dict(os.environ))
print(store.process.proc.pid, flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_service_dies_with_the_process_that_started_it(tmp_path):
    starter = subprocess.Popen([sys.executable, "-c", _START_AND_WAIT, str(tmp_path)], stdout=subprocess.PIPE,
                               text=True)
    service = int(starter.stdout.readline())
    assert _alive(service)
    starter.send_signal(signal.SIGKILL)  # no teardown runs
    starter.wait()
    deadline = time.monotonic() + 30
    while _alive(service) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(service), "SeaweedFS outlived the process that started it"
