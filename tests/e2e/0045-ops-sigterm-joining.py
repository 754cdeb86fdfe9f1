#!/usr/bin/env python3
"""0045-ops-sigterm-joining: SIGTERM while the worker is still joining its
consumer group exits 0 within shutdown_timeout (PRODUCT.md section 9).

A worker that another member's rebalance keeps busy cannot always finish
rd_kafka_consumer_close in time (librdkafka #4527, cooperative protocol). The
close is bounded by shutdown_timeout; after a timed-out close the handle must
not be destroyed (that waits for the close thread forever), or the process
never exits and an orchestrator has to SIGKILL it.

One worker is in the group; eight more start one after the other and each gets
SIGTERM 0.3 s to 1.7 s after its start, i.e. before, during and after its
join. Each must exit 0 within shutdown_timeout (5 s) plus 3 s.
"""

import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bwtest  # noqa: E402
from bwtest import log  # noqa: E402

SHUTDOWN_S = 5


def test(t, stack, args):
    base = stack.worker(args.bin, stack.write_config(shutdown_timeout="%ds" % SHUTDOWN_S),
                        name="member").start()
    base.wait_ready(60)
    cfg = stack.write_config(shutdown_timeout="%ds" % SHUTDOWN_S)
    for i in range(8):
        delay = 0.3 + 0.2 * i
        w = stack.worker(args.bin, cfg, name="joining-%d" % i).start()
        time.sleep(delay)
        t0 = time.monotonic()
        w.proc.send_signal(signal.SIGTERM)
        rc = w.wait(SHUTDOWN_S + 3)
        dt = time.monotonic() - t0
        log("SIGTERM %.1f s after start: exit %s after %.2f s" % (delay, rc, dt))
        t.eq(rc, 0, "SIGTERM %.1f s after start: exit 0 within %d s" % (delay, SHUTDOWN_S + 3))
        if rc is None:
            w.kill9()
    t.eq(base.stop(), 0, "the member stops with 0")


if __name__ == "__main__":
    sys.exit(bwtest.main("sigterm while joining", test))
