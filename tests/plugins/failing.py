"""A test plugin: FedAvg whose client 4 raises, to exercise the failure path of a run."""

from tapdist.fl.algorithms import FedAvg
from tapdist.registry import ALGORITHMS

FAILING_CLIENT = 4


@ALGORITHMS.register("fedavg_failing")
class FailingFedAvg(FedAvg):
    def client_round(self, client, global_sub, round_index, generator):
        if client == FAILING_CLIENT:
            raise RuntimeError(f"injected failure in client {client}")
        return super().client_round(client, global_sub, round_index, generator)
