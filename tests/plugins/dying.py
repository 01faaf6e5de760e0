"""A test plugin: TAP whose rank hosting client 2 is killed (SIGKILL) in the middle of round 2,
on the job's first attempt only, to exercise restarts under `torchrun --max-restarts`."""

import os
import signal

from tapdist.fl.algorithms import TAP
from tapdist.registry import ALGORITHMS

DOOMED_CLIENT, DOOMED_ROUND = 2, 2


@ALGORITHMS.register("tap_dying")
class DyingTAP(TAP):
    def client_round(self, client, global_sub, round_index, generator):
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if first_attempt and (client, round_index) == (DOOMED_CLIENT, DOOMED_ROUND):
            os.kill(os.getpid(), signal.SIGKILL)
        return super().client_round(client, global_sub, round_index, generator)
