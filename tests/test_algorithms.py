"""Local training, TAP replacement and distillation, and the baselines (smoke federation)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import SMOKE_CONFIG
from torch.optim.optimizer import register_optimizer_step_pre_hook

from tapdist.config import load_config
from tapdist.distill import kd_loss, orthogonality_term
from tapdist.fl.algorithms import TAP, Local
from tapdist.local import plan, warmup_lr
from tapdist.models.federated import TapFederation
from tapdist.models.layers import domain_runs

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def federation() -> TapFederation:
    cfg = load_config(SMOKE_CONFIG, ["train.local_steps=2", "tap.finetune_steps=2"])
    return TapFederation(cfg, CPU)


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- local training ---------------------------------------------------------------------------


def test_plan_is_fixed_length_cycles_small_data_and_groups_domains(federation):
    data = federation.train_data(4)  # law_qa (two domains, 24 samples) + objects (24 samples)
    batches = plan(data, micro_batches=10, batch_size=8, generator=generator())
    assert batches.length == 10
    rows = batches.rows["law_qa"]
    assert rows.shape == (10, 4)  # its share of 8 rows
    # cycled epochs: every sample appears before any appears twice
    drawn = rows.flatten()
    assert sorted(drawn[:24].tolist()) == list(range(24))
    domains = data["law_qa"]["domain"][rows]
    assert torch.equal(domains, domains.sort(dim=1).values)  # grouped by domain
    # the runs MoDE routes by are known on the host and match the rows' domains
    assert [domain_runs(d) for d in domains] == batches.runs["law_qa"]
    assert batches.batch(data, "law_qa", 3, torch.device("cpu"))["domain_runs"] == domain_runs(
        domains[3]
    )
    again = plan(data, micro_batches=10, batch_size=8, generator=generator())
    assert all(torch.equal(again.rows[t], batches.rows[t]) for t in data)


def test_warmup_rises_linearly_from_min_lr():
    cfg = load_config(None, ["train.lr=3e-4", "train.min_lr=1e-4", "train.warmup_rounds=4"]).train
    lrs = [warmup_lr(cfg, r) for r in range(6)]
    assert lrs[0] == pytest.approx(1e-4)
    assert lrs[2] == pytest.approx(2e-4)
    assert lrs[4:] == [pytest.approx(3e-4)] * 2


def test_training_is_deterministic_and_reports_every_task(federation):
    names = federation.client_keys(4)
    state = federation.initial_substate(4)
    data = federation.train_data(4)
    outs = []
    for _ in range(2):
        batches = plan(data, 3, 8, generator(7))
        outs.append(federation.trainer.train(names, state, data, batches, 1e-3, generator(7)))
    (a, losses), (b, _) = outs
    assert set(losses) == {"law_qa", "objects"}
    assert all(torch.equal(a[n], b[n]) for n in names)
    assert any(not torch.equal(a[n], state[n]) for n in names)


# --- TAP replacement --------------------------------------------------------------------------


def _tap(federation, **tap) -> TAP:
    overrides = [f"tap.{k}={v}" for k, v in tap.items()]
    cfg = load_config(SMOKE_CONFIG, ["train.local_steps=2", *overrides])
    return TAP(cfg, federation)


def _distinct_states(federation, client):
    initial = federation.initial_substate(client)
    trained = {n: t + 1.0 for n, t in initial.items()}
    return trained, initial


def test_replacement_copies_exactly_the_tasks_components(federation):
    algo = _tap(federation)
    client = 4  # law_qa (text) + objects (image)
    trained, personal = _distinct_states(federation, client)
    algo.personal_loss[client] = {"law_qa": 5.0, "objects": 5.0}
    algo._losses = lambda *a: ({"law_qa": 1.0, "objects": 4.999}, {"law_qa": 5.0, "objects": 5.0})
    replaced = algo._replace(client, trained, personal, {}, generator())
    assert replaced == ["law_qa"]  # objects' gain (0.001) is under its 0.01 margin
    copied = {n for n in personal if torch.equal(personal[n], trained[n])}
    assert copied == set(federation.model.component_names("law_qa"))
    assert not any(n.startswith("encoders.image.") for n in copied)  # never an unused modality
    assert not any(n.startswith("heads.objects.") for n in copied)


def test_first_selection_always_replaces(federation):
    algo = _tap(federation)
    update = algo.client_round(1, federation.initial_substate(1), 0, generator())
    assert update.metrics["replaced.news"] == 1.0
    assert math.isfinite(update.metrics["personal_loss.news"])
    summary = algo.round_summary({1: update.metrics})
    assert summary["replacements"]["text_cls"] == 1


def test_same_round_rule_scores_both_models_on_the_same_batches(federation):
    algo = _tap(federation)
    client = 1
    trained, personal = _distinct_states(federation, client)
    algo.personal_loss[client] = {"news": 0.0}  # stale value; the same-round rule ignores it
    g, p = algo._losses(client, trained, personal, {"news": 9.0}, generator())
    names = federation.client_keys(client)
    data = federation.train_data(client)
    batches = plan(data, algo.cfg.tap.compare_batches, algo.cfg.train.batch_size, generator())
    assert g == federation.trainer.score(names, trained, data, batches)
    assert p == federation.trainer.score(names, personal, data, batches)


def test_stale_rule_uses_the_personal_models_last_training_loss(federation):
    algo = _tap(federation, replacement_rule="stale")
    algo.personal_loss[1] = {"news": 0.5}
    g, p = algo._losses(1, {}, {}, {"news": 0.3}, generator())
    assert (g, p) == ({"news": 0.3}, {"news": 0.5})


def test_tap_finish_yields_every_method(federation):
    algo = _tap(federation, ablations="[no_distillation,double_finetune]")
    algo.client_round(3, federation.initial_substate(3), 0, generator())
    models = algo.finish(3, federation.initial_substate(3), generator(1))
    assert (
        set(models)
        == set(algo.methods)
        == {
            "tap",
            "fedavg",
            "fedavg_ft",
            "tap_no_kd",
            "tap_ft2x",
        }
    )
    assert not torch.equal(
        models["tap"]["heads.news.mlp.0.weight"], models["tap_no_kd"]["heads.news.mlp.0.weight"]
    )  # text classification distils with weight 1.0


def test_local_uploads_nothing_and_keeps_its_own_model(federation):
    algo = Local(load_config(SMOKE_CONFIG, ["train.local_steps=1"]), federation)
    start = federation.initial_substate(2)
    update = algo.client_round(2, start, 0, generator())
    assert update.upload == {}
    assert any(not torch.equal(algo.own[2][n], start[n]) for n in start)


# --- distillation and DisentAFL ---------------------------------------------------------------


def test_kd_is_zero_at_the_teacher_and_positive_elsewhere():
    z = torch.randn(4, 5)
    assert kd_loss("text_cls", z, z, {}, 1.0).abs() < 1e-6
    assert kd_loss("text_cls", z, torch.randn(4, 5), {}, 1.0) > 0
    img = torch.rand(2, 3, 8, 8)
    assert kd_loss("image_gen", img, img + 0.1, {}, 1.0) == pytest.approx(0.01, rel=1e-4)


def test_text_kd_ignores_padding_positions():
    student, teacher = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    answer = torch.tensor([[5, -100, -100], [6, 7, -100]])
    other = teacher.clone()
    other[answer == -100] = 100.0  # differences at padding positions must not count
    a = kd_loss("text_gen", student, teacher, {"answer": answer}, 2.0)
    b = kd_loss("text_gen", student, other, {"answer": answer}, 2.0)
    assert a == pytest.approx(b.item())


def test_orthogonality_is_zero_for_orthogonal_latents(federation):
    term = orthogonality_term(federation, 0.5)
    slots = federation.mod_task_slots()
    width = federation.model.bases[0].hidden
    paths = {t: torch.zeros(2, 8, width) for t in ("news", "objects")}
    (_, i), (_, j) = slots["news"][0], slots["objects"][0]
    paths["news"][:, i, 0] = 1.0
    paths["objects"][:, j, 1] = 1.0
    assert term(paths) == pytest.approx(0.0)
    paths["objects"][:, j, 0] = 1.0  # now 45 degrees apart: cos^2 = 0.5
    assert term(paths) == pytest.approx(0.5 * 0.5)


def test_every_optimizer_step_takes_the_mean_gradient_of_its_own_micro_batches():
    """3 micro-batches with accumulation 2: the second step's group is one micro-batch, and its
    gradient is that micro-batch's, not half of it."""
    settings = ["train.accumulation=2", "model.lora_dropout=0.0", "train.clip_norm=0"]
    fed = TapFederation(load_config(SMOKE_CONFIG, settings), CPU)
    client, trainer = 1, fed.trainer
    names, data = fed.client_keys(client), fed.train_data(client)
    batches = plan(data, 3, 8, generator(3))
    state = fed.initial_substate(client)
    stepped = []

    def record(optimizer, args, kwargs):
        stepped.append([p.grad.clone() for p in fed.model.trainable_parameters(names)])

    hook = register_optimizer_step_pre_hook(record)  # every optimizer
    try:
        trainer.train(names, state, data, batches, 0.0, generator(4))  # lr 0: nothing moves
    finally:
        hook.remove()
    fed.model.load_state(state, names)
    fed.model.train()
    params = fed.model.trainable_parameters(names)
    own = []
    for index in range(3):
        fed.model.zero_grad(set_to_none=True)
        trainer._micro_batch(data, batches, index, None, None)[0].backward()
        own.append([p.grad.clone() for p in params])
    means = [[(a + b) / 2 for a, b in zip(own[0], own[1])], own[2]]
    assert len(stepped) == 2
    for got, want in zip(stepped, means):
        assert all(torch.allclose(g, w, rtol=1e-5, atol=1e-8) for g, w in zip(got, want))


def test_bf16_autocast_trains_fp32_states(federation):
    cfg = load_config(SMOKE_CONFIG, ["train.amp=bf16"])
    from tapdist.local import LocalTrainer

    trainer = LocalTrainer(federation.model, cfg.train, CPU)
    assert trainer.autocast
    data = federation.train_data(2)  # vqa: image + text, text generation
    names = federation.client_keys(2)
    state, losses = trainer.train(
        names,
        federation.initial_substate(2),
        data,
        plan(data, 2, 4, generator()),
        1e-3,
        generator(),
    )
    assert all(t.dtype == torch.float32 for t in state.values())
    assert all(math.isfinite(v) for v in losses.values())


# --- a federation file must fit the config ----------------------------------------------------


@pytest.fixture(scope="module")
def smoke_file(tmp_path_factory):
    from tapdist.data.build import build_federation

    out = tmp_path_factory.mktemp("fed") / "smoke.h5"
    build_federation(SMOKE_CONFIG.parent / "federations" / "smoke.yaml", out, progress=False)
    return out


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.clients=[{tasks: [news], samples: 4}]", "data.clients do not match the clients"),
        (
            "data.tasks=[{name: news, kind: text_cls, modalities: [text], domains: [news], "
            "classes: 3}]",
            "data.tasks do not match the tasks of the federation file .*: law_qa, news, objects",
        ),
        ("model.answer_len=6", "set model.answer_len = 4"),
    ],
)
def test_a_config_that_does_not_fit_its_federation_file_is_refused(smoke_file, override, message):
    from tapdist.config import ConfigError

    config = SMOKE_CONFIG.parent / "smoke_hdf5.yaml"
    cfg = load_config(config, [f"data.path={smoke_file}", override])
    with pytest.raises(ConfigError, match=message):
        TapFederation(cfg, CPU)


@pytest.mark.parametrize("source", ["synthetic", "hdf5"])
def test_a_clients_weight_is_its_training_samples_over_all_its_tasks(source, smoke_file):
    """The averaging weight (and placement) counts every task's samples: a synthetic
    client's ``samples`` is per task."""
    if source == "synthetic":
        cfg = load_config(SMOKE_CONFIG, [])
    else:
        cfg = load_config(SMOKE_CONFIG.parent / "smoke_hdf5.yaml", [f"data.path={smoke_file}"])
    fed = TapFederation(cfg, CPU)
    assert any(len(c.tasks) > 1 for c in fed.clients())
    for client in fed.clients():
        data = fed.train_data(client.id)
        assert client.num_samples == sum(len(fields["domain"]) for fields in data.values())


def test_a_federation_file_run_reads_its_tasks_and_splits(smoke_file):
    cfg = load_config(SMOKE_CONFIG.parent / "smoke_hdf5.yaml", [f"data.path={smoke_file}"])
    fed = TapFederation(cfg, CPU)
    assert [c.tasks for c in fed.clients()][3] == ("news", "recon")
    assert len(fed.train_data(0)["objects"]["label"]) == 32
    assert len(fed.test_data(0)["objects"]["label"]) == 16
    assert set(fed.train_data(0)["objects"]["label"].tolist()) <= {0, 1, 2, 3, 4}
