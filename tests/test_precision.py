"""bf16 training: frozen weights read from bf16 copies made once, activations cast once.

Autocast casts a frozen weight (not a trainable leaf, so not cached) at every use, and an input
at every matmul that reads it. The trainer swaps in bf16 copies of the frozen matmul weights
while it computes; the layers cast a layer norm's output once for all its readers. These tests
run bf16 autocast on the CPU, where it follows the same code.
"""

from __future__ import annotations

import pytest
import torch
from conftest import SMOKE_CONFIG
from torch.utils._python_dispatch import TorchDispatchMode

from tapdist.config import load_config
from tapdist.local import LocalTrainer, plan
from tapdist.models.backbone import MatmulWeights, load_backbone
from tapdist.models.federated import TapFederation
from tapdist.models.layers import LoraSpec, matmul_input, tower_layer

CPU = torch.device("cpu")
BF16 = ["train.amp=bf16", "model.lora_dropout=0.1"]


class _Casts(TorchDispatchMode):
    """Every cast between floating dtypes dispatched: (source tensor, target dtype)."""

    def __init__(self):
        super().__init__()
        self.casts: list[tuple[torch.Tensor, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        to = kwargs.get("dtype")
        if func.overloadpacket is torch.ops.aten._to_copy and to not in (None, args[0].dtype):
            if args[0].is_floating_point():
                self.casts.append((args[0], to))
        return func(*args, **kwargs)


@pytest.fixture(scope="module", params=["flava", "vilt", "hf"])
def federation(request) -> TapFederation:
    return TapFederation(load_config(SMOKE_CONFIG, [*BF16, f"model.backbone={request.param}"]), CPU)


def _train(federation: TapFederation, trainer: LocalTrainer, client: int):
    data = federation.train_data(client)
    return trainer.train(
        federation.client_keys(client),
        federation.initial_substate(client),
        data,
        plan(data, 4, 8, torch.Generator().manual_seed(3)),
        1e-3,
        torch.Generator().manual_seed(4),
    )


@pytest.mark.parametrize("client", [2, 3])  # vqa (image + text); news + recon
def test_bf16_copies_of_frozen_weights_train_as_autocast_casts_do(federation, client):
    trainer = LocalTrainer(federation.model, federation.cfg.train, CPU)
    assert trainer.autocast and trainer.weights is not None
    reference = LocalTrainer(federation.model, federation.cfg.train, CPU)
    reference.weights = None  # autocast casts each frozen weight where it is read
    expected, expected_losses = _train(federation, reference, client)
    state, losses = _train(federation, trainer, client)
    assert losses == expected_losses
    assert all(torch.equal(state[n], expected[n]) for n in expected)
    # outside the trainer the frozen weights are the fp32 originals
    frozen = [p for p in federation.model.parameters() if not p.requires_grad]
    assert {p.dtype for p in frozen} == {torch.float32}


def test_no_frozen_weight_is_cast_while_the_trainer_computes(federation):
    model, trainer = federation.model, federation.trainer
    frozen = {id(p) for p in model.parameters() if not p.requires_grad}
    data = federation.train_data(2)
    batches = plan(data, 1, 8, torch.Generator().manual_seed(0))
    model.train()
    counted = _Casts()
    with trainer.computing(), counted:
        loss, _ = trainer._micro_batch(data, batches, 0, None, None)
        loss.backward()
    model.zero_grad(set_to_none=True)
    assert counted.casts and not [t for t, _ in counted.casts if id(t) in frozen]
    without = _Casts()  # the same step with the fp32 originals: autocast casts them
    with without:
        trainer._micro_batch(data, batches, 0, None, None)
    assert [t for t, _ in without.casts if id(t) in frozen]


def test_weights_return_to_fp32_when_a_step_fails():
    layer = torch.nn.Linear(4, 4).requires_grad_(False)
    original = layer.weight.data_ptr()
    weights = MatmulWeights(torch.nn.Sequential(layer), torch.bfloat16)
    with pytest.raises(RuntimeError, match="mid-step"), weights.swapped_in():
        with weights.swapped_in():  # nested: no second swap
            assert layer.weight.dtype == torch.bfloat16
        assert layer.weight.dtype == torch.bfloat16
        raise RuntimeError("mid-step")
    assert layer.weight.dtype == torch.float32 and layer.weight.data_ptr() == original


def test_weights_changed_after_their_copies_were_made_are_refused():
    layer = torch.nn.Linear(4, 4).requires_grad_(False)
    weights = MatmulWeights(torch.nn.Sequential(layer), torch.bfloat16)
    with torch.no_grad():
        layer.weight.mul_(2.0)  # loaded or edited in place: the copy no longer matches
    with pytest.raises(RuntimeError, match="build a new LocalTrainer"), weights.swapped_in():
        pass
    assert layer.weight.dtype == torch.float32


def test_a_tower_layer_casts_each_layer_norm_output_once():
    """Autocast alone would cast the first norm's output for q, k, v and the q and v LoRAs."""
    backbone = load_backbone("flava", "tiny", encoder_lora=LoraSpec(4, 8.0, 0.1))
    base = backbone.image_encoder._bases[0]
    x = torch.randn(2, 5, base.hidden)
    counted = _Casts()
    with _autocast(), counted:
        tower_layer(base, x, None, 0.1, 0.1)
    activations = [t for t, _ in counted.casts if t.shape[:2] == x.shape[:2]]
    assert len(activations) == 2  # ln1's output and ln2's


def _autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def test_matmul_input_casts_only_under_autocast():
    x = torch.randn(3, 4)
    assert matmul_input(x) is x
    with _autocast():
        assert matmul_input(x).dtype == torch.bfloat16
        low = x.bfloat16()
        assert matmul_input(low) is low
