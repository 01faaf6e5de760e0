"""Captured micro-batches (tapdist.graphs) train exactly as the eager steps do."""

from __future__ import annotations

import pytest
import torch
from conftest import SMOKE_CONFIG

from tapdist.config import load_config
from tapdist.graphs import StepGraphs
from tapdist.local import LocalTrainer, plan
from tapdist.models.federated import TapFederation

CPU = torch.device("cpu")
# several optimizer steps of two accumulated micro-batches; LoRA dropout on (a random stream)
OVERRIDES = ["train.local_steps=3", "train.accumulation=2", "model.lora_dropout=0.1"]


def _train(federation: TapFederation, trainer: LocalTrainer, client: int):
    data = federation.train_data(client)
    batches = plan(data, 6, 8, torch.Generator().manual_seed(3))
    return trainer.train(
        federation.client_keys(client),
        federation.initial_substate(client),
        data,
        batches,
        1e-3,
        torch.Generator().manual_seed(4),
    )


def _federation(device: torch.device, overrides=()) -> TapFederation:
    return TapFederation(load_config(SMOKE_CONFIG, [*OVERRIDES, *overrides]), device)


@pytest.fixture(scope="module")
def federation() -> TapFederation:
    return _federation(CPU)


@pytest.mark.parametrize("client", [0, 2, 4])
def test_replayed_steps_train_the_same_state_as_eager_steps(federation, client):
    """The static buffers, the gradients taken into them and their accumulation into ``.grad``
    give the eager result bit for bit (on the CPU a "replay" reruns the step on the buffers)."""
    eager = LocalTrainer(federation.model, federation.cfg.train, CPU)
    assert eager.graphs is None  # nothing is captured on a CPU
    expected, expected_losses = _train(federation, eager, client)

    graphed = LocalTrainer(federation.model, federation.cfg.train, CPU)
    graphed.graphs = StepGraphs(CPU)
    state, losses = _train(federation, graphed, client)
    assert losses == expected_losses
    assert all(torch.equal(state[n], expected[n]) for n in expected)
    # gradients are laid out as their parameters, as the eager backward (and fused AdamW) needs
    params = dict(federation.model.named_parameters())
    held = [params[n] for n in federation.client_keys(client) if params[n].grad is not None]
    assert held and all(p.grad.stride() == p.stride() for p in held)
    tasks = federation.specs[client].tasks
    multi_domain = any(len(federation.model.tasks[t].domains) > 1 for t in tasks)
    # law_qa spans two domains: its micro-batches route differently and run eagerly
    assert graphed.graphs.replays == (0 if multi_domain else 6)

    # scoring (eval mode, forward only) replays graphs of its own
    data = federation.train_data(client)
    batches = plan(data, 3, 8, torch.Generator().manual_seed(6))
    names = federation.client_keys(client)
    assert graphed.score(names, state, data, batches) == eager.score(names, state, data, batches)
    assert graphed.graphs.replays == (0 if multi_domain else 9)


def test_a_step_with_a_parameter_that_gets_no_gradient_runs_eagerly(federation):
    graphs = StepGraphs(CPU)
    used = torch.nn.Parameter(torch.ones(2))
    unused = torch.nn.Parameter(torch.ones(2))

    def forward(inputs):
        loss = (used * inputs["t"]["x"]).sum()
        return loss, loss.detach()[None]

    inputs = {"t": {"x": torch.arange(2.0)}}
    assert graphs.step("k", inputs, forward, [used, unused], 1) is None
    assert graphs.step("k", inputs, forward, [used, unused], 1) is None  # remembered
    assert graphs.replays == 0
    assert graphs.step("j", inputs, forward, [used], 2) is not None
    assert torch.equal(used.grad, torch.arange(2.0) / 2)


def test_a_key_trained_with_other_parameters_gets_a_graph_of_its_own():
    graphs = StepGraphs(CPU)
    a, b = torch.nn.Parameter(torch.ones(1)), torch.nn.Parameter(torch.ones(1))

    def forward(inputs):
        loss = (a * b * inputs["t"]["x"]).sum()
        return loss, loss.detach()[None]

    graphs.step("k", {"t": {"x": torch.ones(1)}}, forward, [a], 1)
    graphs.step("k", {"t": {"x": torch.ones(1)}}, forward, [a, b], 1)
    assert a.grad.item() == 2.0 and b.grad.item() == 1.0
    assert len(graphs._graphs) == 2


def test_graphs_are_kept_up_to_capacity():
    graphs = StepGraphs(CPU, capacity=2)
    weight = torch.nn.Parameter(torch.ones(1))

    def forward(inputs):
        loss = (weight * inputs["t"]["x"]).sum()
        return loss, loss.detach()[None]

    for key in ("a", "b", "a", "c"):
        graphs.step(key, {"t": {"x": torch.ones(1)}}, forward, [weight], 1)
    assert [key for key, *_ in graphs._graphs] == ["a", "c"]  # b was the least recently used
    assert weight.grad.item() == 4.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_cuda_graphs_compute_the_eager_gradients_on_a_gpu(amp):
    """A replayed micro-batch gives the eager step's losses and gradients, and a whole graphed
    training run the eager run's losses: in fp32 up to the atomics of some backward kernels
    (two eager runs differ as much); in bf16 up to a bf16 rounding, since a captured step casts
    a weight anew for each use, so the gradients of its uses meet in fp32 rather than in bf16."""
    cuda = torch.device("cuda")
    federation = _federation(cuda, [f"train.amp={amp}"])
    eager_cfg = load_config(SMOKE_CONFIG, [*OVERRIDES, f"train.amp={amp}", "train.cuda_graphs=off"])
    eager = LocalTrainer(federation.model, eager_cfg.train, cuda)
    graphed = LocalTrainer(federation.model, federation.cfg.train, cuda)
    assert eager.graphs is None and graphed.graphs is not None
    model = federation.model
    grad_tol = {"rtol": 1e-4, "atol": 1e-6} if amp == "off" else {"rtol": 8e-3, "atol": 1e-4}
    for client in (0, 2, 3):  # objects; vqa (image + text); news + recon (two tasks, two lanes)
        names = federation.client_keys(client)
        params = dict(model.named_parameters())
        trained = [params[n] for n in names]
        data = federation.train_data(client)
        data, batches = eager._on_device(data, plan(data, 2, 8, torch.Generator().manual_seed(5)))
        model.load_state(federation.initial_substate(client), names)
        model.train()
        results = []
        for trainer in (eager, graphed, graphed):  # eager; capture + replay; replay
            model.zero_grad(set_to_none=True)
            torch.manual_seed(7)
            losses = trainer._step(data, batches, 1, trained)
            results.append((losses.clone(), [p.grad.clone() for p in trained]))
        for losses, grads in results[1:]:
            torch.testing.assert_close(losses, results[0][0], rtol=1e-5, atol=1e-6)
            for grad, expected in zip(grads, results[0][1]):
                torch.testing.assert_close(grad, expected, **grad_tol)
        state, expected_losses = _train(federation, eager, client)
        _, losses = _train(federation, graphed, client)
        assert losses == pytest.approx(expected_losses, rel=1e-3 if amp == "off" else 1e-2)
        scored = [t.score(names, state, data, batches) for t in (eager, graphed)]
        assert scored[1] == pytest.approx(scored[0], rel=1e-5)
    # per client: a training graph (2 + 6 replays) and a scoring graph (2)
    assert graphed.graphs.captures == 6 and graphed.graphs.replays == 3 * (2 + 6 + 2)
