"""Draining the app before `facediffuser serve` stops it: new requests get 503 + Retry-After, the ones in flight
finish (up to `drain_timeout_s`), then Serve and Ray go down.

The flag and the counts travel through Ray's internal key-value store (the GCS), not through a call to the ingress:
a deployment-handle call would queue behind the very requests it waits for when the ingress is full.

    driver (serving/app.py)                      ingress replica (serving/ingress.py, gate.py)
    start_draining(app)  ── flag ──▶             DrainWatch thread: reads the flag every POLL_S, sets
                                                 GATE.draining (the gate answers 503 draining), publishes
    in_flight(app, since) ◀── counts ──          GATE.in_flight (requests inside the gate) while draining
    clear(app)  (at deploy and after the stop)
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass

NAMESPACE = "facediffuser_drain"
POLL_S = 0.2


@dataclass
class GateState:
    """What the gate of this ingress replica knows: whether it drains, and the requests inside it now."""

    draining: bool = False
    in_flight: int = 0


GATE = GateState()  # one ingress replica per process


def _flag_key(app_name: str) -> str:
    return f"{app_name}/draining"


def _count_prefix(app_name: str) -> str:
    return f"{app_name}/in_flight/"


def _kv():
    from ray.experimental import internal_kv

    return internal_kv


def clear(app_name: str) -> None:
    """No drain flag or counts for `app_name` (a new deployment of that name starts open)."""
    kv = _kv()
    kv._internal_kv_del(_flag_key(app_name), namespace=NAMESPACE)
    kv._internal_kv_del(_count_prefix(app_name), del_by_prefix=True, namespace=NAMESPACE)


def start_draining(app_name: str) -> str:
    """Tell the app's ingress replicas to refuse new requests; → the flag's value (for `in_flight`)."""
    said = f"{time.time():.6f}"
    _kv()._internal_kv_put(_flag_key(app_name), said, overwrite=True, namespace=NAMESPACE)
    return said


def in_flight(app_name: str, since: str) -> int | None:
    """Requests inside the app's ingress replicas, as they published them once they saw the flag `since`
    (`start_draining`'s answer); None while none has."""
    kv = _kv()
    total, heard = 0, False
    for key in kv._internal_kv_list(_count_prefix(app_name), namespace=NAMESPACE):
        try:
            entry = json.loads(kv._internal_kv_get(key, namespace=NAMESPACE) or b"{}")
        except ValueError:
            continue
        if entry.get("flag") == since:
            total, heard = total + int(entry.get("in_flight", 0)), True
    return total if heard else None


def wait_until_idle(app_name: str, timeout_s: float, silent_s: float = 3.0) -> int:
    """Drain: flag set, then wait until the ingress replicas report no request in flight twice in a row, or
    `timeout_s` passes. No report within `silent_s` means no ingress replica is there to drain. → the requests
    still in flight when it stopped waiting (0: all finished)."""
    since = start_draining(app_name)
    deadline, zeros, last = time.monotonic() + timeout_s, 0, 0
    started = time.monotonic()
    while True:
        count = in_flight(app_name, since)
        if count is None:
            if time.monotonic() - started > min(silent_s, timeout_s):
                return 0
        else:
            last = count
            zeros = zeros + 1 if count == 0 else 0
            if zeros >= 2:
                return 0
        if time.monotonic() >= deadline:
            return last
        time.sleep(POLL_S)


class DrainWatch(threading.Thread):
    """In the ingress replica: follows the app's drain flag into GATE and publishes GATE.in_flight while draining
    (a daemon thread: it ends with the replica)."""

    def __init__(self, app_name: str, replica_id: str):
        super().__init__(name="drain-watch", daemon=True)
        self.app_name, self.key = app_name, f"{_count_prefix(app_name)}{replica_id}"

    def run(self) -> None:
        kv = _kv()
        while True:
            try:
                said = kv._internal_kv_get(_flag_key(self.app_name), namespace=NAMESPACE)
                GATE.draining = said is not None
                if GATE.draining:
                    kv._internal_kv_put(
                        self.key,
                        json.dumps({"in_flight": GATE.in_flight, "flag": said.decode()}),
                        overwrite=True,
                        namespace=NAMESPACE,
                    )
            except Exception:  # the GCS is restarting or going away: keep the last state, try again
                pass
            time.sleep(POLL_S)
