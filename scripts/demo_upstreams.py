"""Starts the two demo hospitals of the shipped configuration: sekmet-fhir servers on
127.0.0.1:8090 and :8091 (base /fhir) with synthetic patients, and keeps them running until killed.
Used by scripts/demo; prints one line per hospital when it is ready."""

import shutil
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "e2e"))
from fixtures import Sekmet  # noqa: E402

work = Path(sys.argv[1])
shutil.rmtree(work, ignore_errors=True)
work.mkdir(parents=True)
servers = []


def stop(*_):
    for s in servers:
        s.stop()
    sys.exit(0)


signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
for name, port, seed in (("demo-contoso-general", 8090, 11), ("demo-fabrikam-clinic", 8091, 22)):
    s = Sekmet(work, name, port=port)
    servers.append(s)
    ids = s.seed(seed=seed, count=5)
    print(f"{name}: {s.base} with {len(ids)} synthetic patients", flush=True)
print("ready", flush=True)
while True:
    time.sleep(3600)
