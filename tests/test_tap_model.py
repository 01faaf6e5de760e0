"""The TAP model on tiny FLAVA and ViLT backbones: components, shared bases, states."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import SMOKE_CONFIG
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from tapdist.checkpoint import load_state, save_state
from tapdist.config import load_config
from tapdist.data.synthetic import make_task_data
from tapdist.local import model_inputs
from tapdist.models.federated import build_union_model
from tapdist.models.layers import LoRA, stacked_adapted
from tapdist.models.tap import PATHS, TapModel


@pytest.fixture(scope="module", params=["flava", "vilt", "hf"])
def model(request) -> TapModel:
    cfg = load_config(SMOKE_CONFIG, [f"model.backbone={request.param}"])
    return build_union_model(cfg)


def batch_for(model: TapModel, task: str, n: int = 4, seed: int = 0) -> dict:
    data = make_task_data(model.tasks[task], n, 12, model.vocab_size, 4, model.domains, (seed,))
    return model_inputs(data, torch.device("cpu"))


def test_gradients_reach_exactly_the_component_set(model):
    for task in model.tasks:  # includes a multi-modal task and a multi-domain task
        model.zero_grad(set_to_none=True)
        model.loss(task, batch_for(model, task)).backward()
        touched = {n for n, p in model.named_parameters() if p.grad is not None}
        assert touched == set(model.component_names(task)), task
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        assert not touched & frozen


class _Operators(TorchDispatchMode):
    """The names of the aten operators dispatched."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_backward_neither_zero_fills_index_gradients_nor_copies_parameter_gradients(model):
    """In the encoders and gated layers, picking a path, a domain's samples or dropping the path
    axis is a view whose gradient is a view, one stack or one cat, not a zero-filled tensor per
    pick; a stacked LoRA's gradient reaches each parameter in its own layout, not copied
    parameter by parameter. The text-generation head's torch attention does pick its q, k and
    v, so the test differentiates the path features, not the loss."""
    model.train()
    for task in model.tasks:  # law_qa's batch holds two domains
        model.zero_grad(set_to_none=True)
        _, paths = model(task, batch_for(model, task))
        with _Operators() as seen:
            paths.square().sum().backward()
        assert not {"select_backward", "slice_backward", "new_empty_strided"} & set(seen.names)
    model.zero_grad(set_to_none=True)


def test_components_follow_the_structure(model):
    news = set(model.component_names("news"))
    assert not any(n.startswith("encoders.image.") for n in news)  # never an unused modality
    assert not any(".mode_q.experts.general_object." in n for n in news)  # only its domains
    assert any(".mode_q.experts.news." in n for n in news)
    law = set(model.component_names("law_qa"))
    assert any("experts.law_answering." in n for n in law)
    assert any("experts.medicine_answering." in n for n in law)
    both = model.client_names(["news", "recon"])
    assert set(both) == news | set(model.component_names("recon"))
    assert both == [n for n in model.trainable_names() if n in set(both)]  # union order


def test_experts_share_the_frozen_layer_storage(model):
    for i, layer_weight in enumerate([base.fc1.weight for base in model.bases]):
        grid = model.mote_experts if i == 0 else model.mome_experts
        blocks = model.mote_blocks if i == 0 else model.mome_blocks
        experts = [e for row in grid[0].values() for e in row.values()]
        experts += [
            e
            for b in blocks.values()
            for layer in b.layers
            for mode in (layer.mode_q, layer.mode_v)
            for e in mode.experts.values()
        ]
        assert len(experts) > 4
        for expert in experts:
            assert expert.base.fc1.weight.data_ptr() == layer_weight.data_ptr()
    # the frozen bases are registered once: nothing frozen hides inside experts or blocks
    for prefix in ("mote_experts", "mome_experts", "mote_blocks", "mome_blocks"):
        assert all(p.requires_grad for p in getattr(model, prefix).parameters())


def test_attention_lora_is_w_x_plus_b_a_x():
    base = torch.nn.Linear(6, 5)
    lora = LoRA(6, 5, rank=2, alpha=4.0, dropout=0.0)
    torch.nn.init.normal_(lora.lora_B)
    x = torch.randn(1, 3, 6)  # one path
    expected = x @ base.weight.T + base.bias + 2.0 * (x @ lora.lora_A.T @ lora.lora_B.T)
    torch.testing.assert_close(stacked_adapted(base, [lora], x), expected)


def test_each_sample_is_routed_by_its_own_domain(model):
    model.eval()
    for layer in model.mome_blocks["shared"].layers:  # make the domain experts differ
        for expert in layer.mode_q.experts.values():
            torch.nn.init.normal_(expert.fc2.lora_B, std=0.5)
    batch = batch_for(model, "law_qa", n=6)
    assert len(set(batch["domain"].tolist())) == 2
    with torch.no_grad():
        together, _ = model("law_qa", batch)
        alone = [model("law_qa", {k: v[i : i + 1] for k, v in batch.items()})[0] for i in range(6)]
    torch.testing.assert_close(together, torch.cat(alone), rtol=1e-4, atol=1e-5)
    model.train()


def test_text_generation_head_has_no_embedding_table(model):
    head = model.heads["vqa"]
    assert not any(isinstance(m, torch.nn.Embedding) for m in head.modules())


def test_state_roundtrip_and_strict_keys(model, tmp_path):
    names = model.client_names(["vqa"])
    state = {n: t + 0.5 for n, t in model.get_state(names).items()}
    save_state(tmp_path / "client.h5", state)
    back = load_state(tmp_path / "client.h5")
    model.load_state(back, names)
    after = model.get_state(names)
    assert all(torch.equal(after[n], state[n]) for n in names)
    with pytest.raises(KeyError, match="missing .*unexpected"):
        model.load_state({n: state[n] for n in names[1:]}, names)
    with pytest.raises(KeyError, match="not trainable tensors of the union model"):
        model.get_state(["fusion.0.intermediate.dense.weight"])
    assert set(names) <= set(model.trainable_names())


def test_states_reach_the_parameters_in_place_after_a_conversion_replaced_them():
    """Trainable parameters are looked up by name once; a conversion or an assigning
    ``load_state_dict`` that puts new parameter objects in place makes the model look again."""
    model = build_union_model(load_config(SMOKE_CONFIG, []))
    names = model.client_names(["news"])
    assert all(
        p is model.get_parameter(n) for n, p in zip(names, model.trainable_parameters(names))
    )
    overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        model.to(torch.float64)  # new parameter objects, not new data in the old ones
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(overwrite)
    state = {n: torch.full_like(t, 0.25) for n, t in model.get_state(names).items()}
    model.load_state(state, names)
    assert all(torch.equal(model.get_parameter(n), state[n]) for n in names)
    model.load_state_dict(
        {k: v.float().clone() for k, v in model.state_dict().items()}, assign=True
    )
    trained = model.trainable_parameters(names)
    assert all(
        p is model.get_parameter(n) and p.dtype == torch.float32 for n, p in zip(names, trained)
    )


def test_train_and_eval_leave_every_module_in_the_mode_and_call_their_own_train(model):
    """TapModel.train sets the flags from a flat list: every module ends in the mode asked
    for, whatever mix of flags it started from, and a submodule with its own ``train``
    (transformers' models) is still called to set its subtree."""
    own = [m for m in model.modules() if type(m).train is not nn.Module.train and m is not model]
    calls = []
    for module in own:  # a spy on the instance, still an override of the class's train
        module.train = functools.partial(_spied_train, module, calls)
    try:
        generator = torch.Generator().manual_seed(0)
        for mode in (True, False, True):
            for module in model.modules():  # a mixed start
                module.training = bool(torch.randint(2, (1,), generator=generator))
            assert model.train(mode) is model
            assert all(module.training is mode for module in model.modules())
            model.eval()
            assert not any(module.training for module in model.modules())
        asked = (True, False, False, False, True, False)
        assert calls == [(module, mode) for mode in asked for module in own]
    finally:
        for module in own:
            del module.train
    with pytest.raises(ValueError, match="boolean"):
        model.train("yes")


def _spied_train(module: nn.Module, calls: list, mode: bool = True) -> nn.Module:
    calls.append((module, mode))
    return type(module).train(module, mode)


def test_model_info_reports_server_and_clients(smoke_config):
    from tapdist.info import model_info

    report = model_info(load_config(smoke_config))
    rows = [line for line in report.splitlines() if line.startswith("| ")]
    assert rows[2].startswith("| server (union) |")
    assert [r.split("|")[1].strip() for r in rows[3:]] == [
        "client 0 (objects)",
        "client 1 (news)",
        "client 2 (vqa)",
        "client 3 (news+recon)",
        "client 4 (law_qa+objects)",
    ]
    assert "resident memory" in report and "all_reduce buffer per rank" in report


def tiny_tokenizer(directory) -> int:
    from transformers import BertTokenizerFast

    directory.mkdir(parents=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(35)]
    (directory / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizerFast.from_pretrained(directory).save_pretrained(directory)  # v4 and v5
    return len(words)


TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def test_hf_backbone_and_tokenizer_load_from_local_directories(tmp_path):
    """What users with real weights do: from_pretrained(local_dir), and a tokenizer dir."""
    from transformers import BertConfig, BertModel, ViTConfig, ViTModel

    from tapdist.config import ConfigError

    BertModel(BertConfig(**TINY, vocab_size=100)).save_pretrained(tmp_path / "text")
    ViTModel(ViTConfig(**TINY, image_size=32, patch_size=8)).save_pretrained(tmp_path / "vision")
    vocab = tiny_tokenizer(tmp_path / "tok")
    overrides = [
        "model.backbone=hf",
        "model.size=full",
        f"model.text_encoder={tmp_path / 'text'}",
        f"model.vision_encoder={tmp_path / 'vision'}",
        f"model.tokenizer={tmp_path / 'tok'}",
    ]
    model = build_union_model(load_config(SMOKE_CONFIG, overrides))
    assert model.heads["vqa"].lm_head.out_features == vocab == model.vocab_size
    assert torch.isfinite(model.loss("vqa", batch_for(model, "vqa")))
    BertModel(BertConfig(**TINY, vocab_size=20)).save_pretrained(tmp_path / "small")
    overrides[2] = f"model.text_encoder={tmp_path / 'small'}"
    with pytest.raises(ConfigError, match="has 40 tokens but the text encoder embeds only 20"):
        build_union_model(load_config(SMOKE_CONFIG, overrides))


@pytest.mark.parametrize("kind", ["flava", "vilt"])
def test_pretrained_directory_is_loaded(tmp_path, kind):
    from transformers import FlavaModel, ViltModel

    from tapdist.models.backbone import hf_config, load_backbone

    saved = (FlavaModel if kind == "flava" else ViltModel)(hf_config(kind, "tiny"))
    saved = saved.to(torch.bfloat16)  # transformers 5 would keep this dtype on load
    saved.save_pretrained(tmp_path / kind)
    layer = (saved.multimodal_model.encoder if kind == "flava" else saved.encoder).layer[0]
    loaded = load_backbone(kind, pretrained=str(tmp_path / kind))
    assert loaded.bases[0].fc1.weight.dtype == torch.float32
    assert torch.equal(loaded.bases[0].fc1.weight, layer.intermediate.dense.weight.float())
    assert not any(p.requires_grad for p in loaded.layers.parameters())


def test_explicit_sizes_override_the_preset():
    sizes = ["model.hidden_size=48", "model.num_heads=4", "model.num_layers=3"]
    model = build_union_model(load_config(SMOKE_CONFIG, sizes))
    assert (model.bases[0].hidden, model.bases[0].heads) == (48, 4)
    assert len(model.encoders["text"].tower.tower.encoder.layer) == 3
    assert torch.isfinite(model.loss("vqa", batch_for(model, "vqa")))


def test_hf_model_without_text_tasks_still_owns_its_frozen_layers():
    from tapdist.models.backbone import load_backbone
    from tapdist.models.tap import TapSettings, TaskSpec

    backbone = load_backbone("hf", "tiny")
    task = TaskSpec("objects", "image_cls", ("image",), ("general_object",), 10)
    model = TapModel(backbone, [task], TapSettings())
    owned = {id(p) for p in model.parameters()}
    assert all(id(p) in owned for b in model.bases for p in b.fc1.parameters())
    model.to(torch.float64)
    assert model.bases[0].q.weight.dtype == torch.float64  # moves with the model


def test_paths_run_together_give_the_per_path_result(model):
    """All paths of a modality run through each gated layer together (stacked LoRAs, the first
    attention once for paths that share it); the features must equal those of running every
    path on its own."""
    from tapdist.models.layers import attend, domain_runs, feed_forward
    from tapdist.models.tap import _masked_mean, routes

    model.eval()
    for task, spec in model.tasks.items():
        batch = batch_for(model, task)
        runs = domain_runs(batch["domain"])
        _, paths = model(task, batch)
        naive = []
        for m in spec.modalities:
            tokens, mask = model.encoders[m](batch)
            for r in routes(spec.kind, m, model.settings.paths):
                x = (model.shared_proj(tokens) if r.shared_input else tokens)[None]
                for blocks, grid, (a, b), name in (
                    (model.mote_blocks, model.mote_experts, r.mote_expert, r.mote_block),
                    (model.mome_blocks, model.mome_experts, r.mome_expert, r.mome_block),
                ):
                    for layer, experts in zip(blocks[name].layers, grid):
                        x = feed_forward([experts[a][b]], attend([layer], x, mask, runs))
                naive.append(_masked_mean(x[0], mask))
        torch.testing.assert_close(paths, torch.stack(naive, dim=1), rtol=1e-5, atol=1e-5)
    model.train()


def test_stacked_lora_is_each_lora_on_its_own_path():
    from tapdist.models.layers import add_stacked_lora

    loras = [LoRA(6, 5, rank=2, alpha=3.0, dropout=0.0) for _ in range(2)]
    for lora in loras:
        torch.nn.init.normal_(lora.lora_B)
    chosen = [loras[0], loras[1], loras[0]]  # a LoRA two paths use
    x = torch.randn(3, 4, 7, 6, requires_grad=True)
    base = torch.randn(3, 4, 7, 5)
    out = add_stacked_lora(base, chosen, x)
    expected = base + torch.stack([lora(x[p]) for p, lora in enumerate(chosen)])
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    grad = loras[0].lora_A.grad.clone()
    loras[0].zero_grad()
    (loras[0](x[0]).sum() + loras[0](x[2]).sum()).backward()  # the same LoRA, path by path
    torch.testing.assert_close(grad, loras[0].lora_A.grad)
    # one LoRA for every path
    torch.testing.assert_close(add_stacked_lora(base, [loras[1]] * 3, x), base + loras[1](x))
    # slices of a batch, as MoDE passes a domain run's rows (neither is contiguous)
    rows = slice(1, 3)
    out = add_stacked_lora(base[:, rows], chosen, x[:, rows])
    torch.testing.assert_close(out, expected[:, rows])


def test_stacked_lora_gradients_come_back_in_each_parameters_layout():
    """The gradients ``autograd.grad`` returns (what a graphed step stores) already have the
    parameters' strides, so neither the eager backward nor the graph copies them one by one."""
    from tapdist.models.layers import add_stacked_lora

    loras = [LoRA(6, 5, rank=2, alpha=4.0, dropout=0.0) for _ in range(3)]
    x = torch.randn(3, 4, 6)
    params = [p for lora in loras for p in (lora.lora_A, lora.lora_B)]
    for chosen in (loras, [loras[0], loras[1], loras[0]]):  # a LoRA two paths use, too
        out = add_stacked_lora(torch.randn(3, 4, 5), chosen, x)
        grads = torch.autograd.grad(out.square().sum(), params, allow_unused=True)
        laid_out = [(g.stride(), p.stride()) for g, p in zip(grads, params) if g is not None]
        assert len(laid_out) == 2 * len(set(chosen))
        assert all(got == wanted for got, wanted in laid_out)


def test_a_peft_lora_layer_adds_its_update_inside_the_matmul():
    from tapdist.models.backbone import _inject_qv_lora
    from tapdist.models.layers import LoraSpec, adapted

    tower = torch.nn.Module()
    tower.query = torch.nn.Linear(6, 5)
    _inject_qv_lora(tower, LoraSpec(2, 3.0, 0.0))
    layer = tower.query
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(3, 7, 6, requires_grad=True)
    expected = layer(x)  # peft's forward: base, then its scale and sum
    grads = torch.autograd.grad(expected.square().sum(), [x, layer.lora_B["default"].weight])
    out = adapted(layer, x)
    torch.testing.assert_close(out, expected)
    for got, want in zip(
        torch.autograd.grad(out.square().sum(), [x, layer.lora_B["default"].weight]), grads
    ):
        torch.testing.assert_close(got, want)
    layer.enable_adapters(False)  # anything but one plain active adapter goes through peft
    torch.testing.assert_close(adapted(layer, x), layer.base_layer(x))


@pytest.mark.parametrize("backbone", ["vilt", "hf"])
def test_operators_do_not_grow_with_the_paths(backbone):
    """The paths run through each gated layer together, so four paths dispatch about as many
    non-view operators as one."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += not func.is_view
            return func(*args, **(kwargs or {}))

    def operators(paths: list[str]) -> int:
        overrides = [f"model.backbone={backbone}", "model.layers_per_block=2", "model.num_layers=4"]
        cfg = load_config(SMOKE_CONFIG, [*overrides, f"model.paths={paths}"])
        model = build_union_model(cfg)
        batch = batch_for(model, "news")
        Count.n = 0
        with Count():
            model.loss("news", batch).backward()
        return Count.n

    one, four = operators(["mod_task"]), operators(list(PATHS))
    assert one < four < 2 * one, (one, four)  # path by path: 2.8x (hf), 3.8x (vilt)


def test_flava_towers_equal_the_transformers_forward():
    """FLAVA's encoders run through tapdist's layer code with fused attention; their output must
    be what transformers computes from the same weights, LoRA and padding mask."""
    from tapdist.models.backbone import _hidden, load_backbone
    from tapdist.models.layers import LoraSpec

    torch.manual_seed(0)
    backbone = load_backbone("flava", "tiny", encoder_lora=LoraSpec(4, 8, 0.0))
    image, text = backbone.image_encoder.eval(), backbone.text_encoder.eval()
    for name, param in [*image.named_parameters(), *text.named_parameters()]:
        if "lora_B" in name:  # LoRA starts at zero: make it count
            torch.nn.init.normal_(param, std=0.3)
    pixels = torch.randn(3, 3, 32, 32)
    ids = torch.randint(0, 1000, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 7:], mask[2, 3:] = 0, 0
    with torch.no_grad():
        expected = _hidden(image.tower(pixel_values=pixels))
        torch.testing.assert_close(image(pixels), expected, rtol=1e-5, atol=1e-5)
        expected = _hidden(text.tower(input_ids=ids, attention_mask=mask))
        real = mask.bool()  # padded positions are never read downstream
        torch.testing.assert_close(text(ids, mask)[real], expected[real], rtol=1e-5, atol=1e-5)
