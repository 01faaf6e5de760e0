"""Held-out evaluation: the overlap scores by hand, and evaluate() on the tiny smoke model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import SMOKE_CONFIG
from torch import nn

from tapdist.config import load_config
from tapdist.data.synthetic import make_task_data
from tapdist.evaluate import (
    IGNORE,
    METRICS,
    answer_scores,
    evaluate,
    exact_match,
    rouge_l,
    token_f1,
)
from tapdist.local import model_inputs
from tapdist.models.federated import build_union_model
from tapdist.models.tap import TaskSpec

CPU = torch.device("cpu")

# --- overlap scores -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pred", "ref", "f1", "rouge", "em"),
    [
        ([1, 2, 3], [1, 2, 3], 1.0, 1.0, 1.0),
        ([1, 2, 3], [1, 2, 4], 2 / 3, 2 / 3, 0.0),  # 2 shared of 3 and 3
        ([2, 1], [1, 2], 1.0, 0.5, 0.0),  # same bag, LCS 1
        ([1, 2, 3, 4], [1, 3, 2, 4], 1.0, 0.75, 0.0),  # LCS 3: 2 * 3 / 8
        ([5, 5, 5], [5, 6], 0.4, 0.4, 0.0),  # repeats count once per match: 2 * 1 / 5
        ([7, 7, 7], [7, 8, 7], 2 / 3, 2 / 3, 0.0),  # two 7s match: 2 * 2 / 6
        ([1, 1, 2], [1, 2, 1], 1.0, 2 / 3, 0.0),
        ([], [1, 2], 0.0, 0.0, 0.0),  # empty prediction
        ([1, 2], [], 0.0, 0.0, 0.0),
        ([], [], 1.0, 1.0, 1.0),  # nothing to predict, nothing predicted
        ([9, 8], [1, 2], 0.0, 0.0, 0.0),
        ([1, 2], [1, 2, 3], 0.8, 0.8, 0.0),  # P = 1, R = 2/3
    ],
)
def test_overlap_scores_by_hand(pred, ref, f1, rouge, em):
    assert token_f1(pred, ref) == pytest.approx(f1)
    assert rouge_l(pred, ref) == pytest.approx(rouge)
    assert exact_match(pred, ref) == em
    assert token_f1(torch.tensor(pred, dtype=torch.long), torch.tensor(ref)) == pytest.approx(f1)


def test_answer_scores_drop_padding_positions():
    pred = torch.tensor([[4, 5, 9, 9], [7, 7, 7, 3], [1, 2, 3, 4], [6, 5, 4, 0]])
    answer = torch.tensor(
        [
            [4, 5, IGNORE, IGNORE],  # the 9s fall on padding and do not count
            [7, 8, 7, IGNORE],
            [IGNORE] * 4,  # all padding: both sides empty
            [4, 5, 6, IGNORE],  # same bag, reversed
        ]
    )
    scores = answer_scores(pred, answer)
    assert scores["token_f1"].tolist() == pytest.approx([1.0, 2 / 3, 1.0, 1.0])
    assert scores["rouge_l"].tolist() == pytest.approx([1.0, 2 / 3, 1.0, 1 / 3])
    assert scores["exact_match"].tolist() == [1.0, 0.0, 1.0, 0.0]


def test_answer_scores_equal_the_sequence_functions():
    gen = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 4, (64, 7), generator=gen)  # a small vocabulary: many repeats
    answer = torch.randint(0, 4, (64, 7), generator=gen)
    answer[torch.rand(64, 7, generator=gen) < 0.3] = IGNORE  # padding anywhere, not just at the end
    answer[:4] = torch.where(torch.arange(7) < 3, pred[:4], IGNORE)  # a few exact matches
    scores = answer_scores(pred, answer)
    for b in range(len(pred)):
        keep = answer[b] != IGNORE
        p, r = pred[b][keep].tolist(), answer[b][keep].tolist()
        assert scores["token_f1"][b].item() == pytest.approx(token_f1(p, r))
        assert scores["rouge_l"][b].item() == pytest.approx(rouge_l(p, r))
        assert scores["exact_match"][b].item() == exact_match(p, r)
    assert scores["exact_match"][:4].tolist() == [1.0] * 4


# --- evaluate() on the smoke model --------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    return build_union_model(load_config(SMOKE_CONFIG))


@pytest.fixture(scope="module")
def data(model):
    cfg = load_config(SMOKE_CONFIG)
    return {
        task: make_task_data(
            spec,
            20,
            cfg.data.text_len,
            model.vocab_size,
            cfg.model.answer_len,
            model.domains,
            (1, 2, 3),
        )
        for task, spec in model.tasks.items()
    }


def test_every_kind_is_covered(model):
    assert {spec.kind for spec in model.tasks.values()} == set(METRICS)


def test_metrics_are_in_range(model, data):
    results = evaluate(model, model.tasks, data, 8, CPU)
    assert list(results) == list(model.tasks)
    for task, metrics in results.items():
        kind = model.tasks[task].kind
        assert list(metrics) == list(METRICS[kind]), task
        assert all(math.isfinite(v) for v in metrics.values()), (task, metrics)
        for name in ("accuracy", "token_f1", "rouge_l", "exact_match", "mse"):
            if name in metrics:
                assert 0.0 <= metrics[name] <= 1.0, (task, name)
        for name in ("loss", "token_ce"):
            if name in metrics:
                assert metrics[name] >= 0.0, (task, name)
        if "perplexity" in metrics:
            assert metrics["perplexity"] >= 1.0


def test_batch_size_does_not_change_the_result(model, data):
    model.train()  # evaluation must switch dropout off by itself
    small = evaluate(model, model.tasks, data, 3, CPU)
    large = evaluate(model, model.tasks, data, 64, CPU)
    for task, metrics in small.items():
        for name, value in metrics.items():
            assert math.isclose(value, large[task][name], rel_tol=1e-5, abs_tol=1e-5), (
                task,
                name,
            )


def test_perplexity_is_exp_token_ce(model, data):
    results = evaluate(model, ["vqa", "law_qa"], data, 7, CPU)
    for metrics in results.values():
        assert metrics["perplexity"] == pytest.approx(math.exp(metrics["token_ce"]))


def _one_by_one(model, task, fields):
    """The head output of every sample, one forward each, in eval mode."""
    model.eval()
    with torch.no_grad():
        for i in range(len(fields["domain"])):
            batch = model_inputs({k: v[i : i + 1] for k, v in fields.items()}, CPU)
            yield batch, model(task, batch)[0]


@pytest.mark.parametrize("task", ["objects", "news"])
def test_classification_matches_a_hand_loop(model, data, task):
    correct, loss = 0, 0.0
    for batch, logits in _one_by_one(model, task, data[task]):
        correct += int(logits.argmax(-1).item() == batch["label"].item())
        loss += F.cross_entropy(logits, batch["label"]).item()
    metrics = evaluate(model, [task], data, 6, CPU)[task]
    assert metrics["accuracy"] == correct / 20
    assert metrics["loss"] == pytest.approx(loss / 20, rel=1e-5)


def test_image_generation_matches_a_hand_loop(model, data):
    samples = _one_by_one(model, "recon", data["recon"])
    errors = [F.mse_loss(out, batch["image"]).item() for batch, out in samples]
    metrics = evaluate(model, ["recon"], data, 6, CPU)["recon"]
    assert metrics["mse"] == pytest.approx(sum(errors) / len(errors), rel=1e-5)


@pytest.mark.parametrize("task", ["vqa", "law_qa"])
def test_text_generation_matches_a_hand_loop(model, data, task):
    ce, tokens, f1, rouge, em = 0.0, 0, [], [], []
    for batch, logits in _one_by_one(model, task, data[task]):
        answer = batch["answer"][0]
        keep = answer != IGNORE
        ce += F.cross_entropy(logits[0][keep], answer[keep], reduction="sum").item()
        tokens += int(keep.sum())
        pred, ref = logits[0].argmax(-1)[keep].tolist(), answer[keep].tolist()
        f1.append(token_f1(pred, ref))
        rouge.append(rouge_l(pred, ref))
        em.append(float(pred == ref))
    metrics = evaluate(model, [task], data, 6, CPU)[task]
    assert metrics["token_ce"] == pytest.approx(ce / tokens, rel=1e-5)
    assert metrics["token_f1"] == pytest.approx(sum(f1) / len(f1))
    assert metrics["rouge_l"] == pytest.approx(sum(rouge) / len(rouge))
    assert metrics["exact_match"] == pytest.approx(sum(em) / len(em))


def test_eval_mode_during_evaluation_and_restored_after(model, data):
    seen = []
    hook = model.register_forward_pre_hook(
        lambda module, args: seen.append(any(m.training for m in module.modules()))
    )
    model.train()
    model.heads["news"].eval()  # a submodule the caller left in eval mode stays so
    try:
        evaluate(model, ["news", "recon"], data, 8, CPU)
        assert seen and not any(seen)
        assert model.training and model.encoders.training
        assert not any(m.training for m in model.heads["news"].modules())
        assert all(m.training for m in model.heads["recon"].modules())
        model.eval()
        evaluate(model, ["news"], data, 8, CPU)
        assert not any(m.training for m in model.modules())
    finally:
        hook.remove()
        model.train()


def test_empty_or_missing_split_names_the_task(model, data):
    empty = {**data, "news": {k: v[:0] for k, v in data["news"].items()}}
    with pytest.raises(ValueError, match="news"):
        evaluate(model, ["objects", "news"], empty, 8, CPU)
    with pytest.raises(ValueError, match="recon"):
        evaluate(model, ["recon"], {"news": data["news"]}, 8, CPU)
    assert model.training  # restored on the error path too


class Oracle(nn.Module):
    """A text-generation model that answers right except at position 0 of flagged samples."""

    def __init__(self, vocab: int):
        super().__init__()
        self.tasks = {"qa": TaskSpec("qa", "text_gen", ("text",), ("d",))}
        self.vocab = vocab

    def forward(self, task, batch):
        pred = batch["answer"].clamp_min(0)
        pred[:, 0] = torch.where(batch["wrong"], 0, pred[:, 0])  # id 0 is in no answer
        return 5.0 * F.one_hot(pred, self.vocab).float(), None


def test_evaluate_scores_an_oracle_exactly():
    gen = torch.Generator().manual_seed(1)
    answer = torch.randint(4, 9, (10, 4), generator=gen)  # repeated ids
    lengths = torch.tensor([4, 3, 1, 2, 4, 4, 0, 3, 2, 1])
    answer[torch.arange(4) >= lengths[:, None]] = IGNORE
    wrong = torch.arange(10) % 2 == 1
    data = {"qa": {"answer": answer, "wrong": wrong, "domain": torch.zeros(10, dtype=torch.long)}}
    metrics = evaluate(Oracle(50), ["qa"], data, 3, CPU)["qa"]
    # a right token costs log(e^5 + 49) - 5, a wrong one log(e^5 + 49)
    bad = int((wrong & (lengths > 0)).sum())
    expected_ce = math.log(math.exp(5) + 49) - 5 * (1 - bad / int(lengths.sum()))
    assert metrics["token_ce"] == pytest.approx(expected_ce)
    assert metrics["exact_match"] == pytest.approx(0.5)  # odd ones miss; empty sample 6 matches
    refs = [answer[b][: lengths[b]].tolist() for b in range(10)]
    preds = [([0] + r[1:] if wrong[b] and r else r) for b, r in enumerate(refs)]
    assert metrics["token_f1"] == pytest.approx(sum(map(token_f1, preds, refs)) / 10)
    assert metrics["rouge_l"] == pytest.approx(sum(map(rouge_l, preds, refs)) / 10)
