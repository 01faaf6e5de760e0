"""A test plugin: TAP whose process hosting client 1 gets SIGTERM during round 1, as a job
does when the scheduler ends or preempts it."""

import os
import signal

from tapdist.fl.algorithms import TAP
from tapdist.registry import ALGORITHMS


@ALGORITHMS.register("tap_preempted")
class PreemptedTAP(TAP):
    def client_round(self, client, global_sub, round_index, generator):
        if (client, round_index) == (1, 1):
            os.kill(os.getpid(), signal.SIGTERM)
        return super().client_round(client, global_sub, round_index, generator)
