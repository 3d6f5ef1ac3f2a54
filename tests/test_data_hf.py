"""Hugging Face datasets as a corpus (--data hf:...): local directories offline, splits, errors."""
import json

import datasets
import pytest

from dynsparse.cli import main
from dynsparse.data import EOS_TEXT, prepare_tokens, text_source
from dynsparse.data.hf import HFSource, parse_spec


@pytest.fixture(autouse=True)
def _hf_cache(tmp_path, monkeypatch):
    """load_dataset converts local files into Arrow under the HF cache: keep it inside the test."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def _lines(blocks):
    return {line for b in blocks for line in b.replace(EOS_TEXT, "\n").splitlines() if line}


def _texts(prefix, n):
    return [f"{prefix} {i}: the king and the queen walked to the castle." for i in range(n)]


def test_saved_dataset_dict_uses_its_own_validation_split(tmp_path):
    train, val = _texts("train", 400), _texts("val", 40)
    ds = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": train, "n": list(range(400))}),
                               "validation": datasets.Dataset.from_dict({"body": val, "n": list(range(40))})})
    ds.save_to_disk(str(tmp_path / "saved"))
    src = text_source(f"hf:{tmp_path / 'saved'}#body")
    assert isinstance(src, HFSource) and src.column == "body"
    blocks = {s: list(src.blocks(s)) for s in ("train", "val", "test")}
    lines = {s: _lines(b) for s, b in blocks.items()}
    assert lines["val"] == set(val)  # the dataset's own validation split, whole
    assert lines["test"] and lines["test"] <= set(train)  # no test split: carved out of train
    assert lines["train"] | lines["test"] == set(train) and not (lines["train"] & lines["test"])
    assert len(lines["test"]) < 0.1 * len(train)
    # The token cache keys on the dataset: a second prepare reuses it.
    data = prepare_tokens(src, vocab_size=300, cache_dir=tmp_path / "cache")
    assert data.tokenizer.decode(data.splits["val"].tolist()) == "".join(blocks["val"])
    again = prepare_tokens(text_source(f"hf:{tmp_path / 'saved'}#body"), vocab_size=300, cache_dir=tmp_path / "cache")
    assert again.path == data.path


def test_data_file_folder_with_one_split_splits_like_user_text(tmp_path):
    (tmp_path / "ds").mkdir()
    texts = _texts("doc", 600)
    (tmp_path / "ds" / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    src = text_source(f"hf:{tmp_path / 'ds'}")
    lines = {s: _lines(src.blocks(s)) for s in ("train", "val", "test")}
    assert all(lines.values()) and set().union(*lines.values()) == set(texts)
    assert not (lines["train"] & lines["val"]) and not (lines["val"] & lines["test"])
    assert len(lines["train"]) > 0.8 * len(texts)
    assert any((tmp_path / "hf-cache").iterdir())  # converted to Arrow in the (test's) HF cache


def test_train_on_a_local_hf_dataset(tmp_path, capsys):
    datasets.Dataset.from_dict({"text": _texts("doc", 300)}).save_to_disk(str(tmp_path / "d"))
    code = main(["train", "--data", f"hf:{tmp_path / 'd'}", "--out", str(tmp_path / "run"), "--cache-dir",
                 str(tmp_path / "cache"), "--d-model", "32", "--n-layer", "1", "--n-head", "2", "--vocab-size", "300",
                 "--seq-len", "16", "--batch-size", "4", "--max-steps", "2", "--eval-batches", "1", "--no-progress",
                 "--json"])
    assert code == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["steps"] == 2 and metrics["val_loss"] > 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"] == f"hf:{tmp_path / 'd'}"


def test_single_saved_dataset_and_other_split_names(tmp_path):
    datasets.Dataset.from_dict({"text": _texts("x", 100)}).save_to_disk(str(tmp_path / "one"))
    assert set(text_source(f"hf:{tmp_path / 'one'}").splits) == {"train"}
    datasets.DatasetDict({"dev": datasets.Dataset.from_dict({"text": ["a"]}),
                          "other": datasets.Dataset.from_dict({"text": ["b"]})}).save_to_disk(str(tmp_path / "two"))
    with pytest.raises(ValueError, match="no 'train' split.*dev, other"):
        text_source(f"hf:{tmp_path / 'two'}")


def test_missing_text_column_names_the_available_ones(tmp_path):
    datasets.Dataset.from_dict({"title": ["a"], "body": ["b"]}).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(ValueError, match="no text column 'text'.*title, body"):
        text_source(f"hf:{tmp_path / 'd'}")
    datasets.Dataset.from_dict({"n": [1, 2]}).save_to_disk(str(tmp_path / "nums"))
    with pytest.raises(ValueError, match="not text"):
        text_source(f"hf:{tmp_path / 'nums'}#n")


def test_spec_parsing():
    assert parse_spec("hf:wikitext:wikitext-2-raw-v1") == ("wikitext", "wikitext-2-raw-v1", "text")
    assert parse_spec("hf:user/corpus#content") == ("user/corpus", None, "content")
    with pytest.raises(ValueError, match="empty dataset name"):
        parse_spec("hf:#text")


def test_unknown_dataset_offline_is_one_line_cli_error(tmp_path, capsys):
    # conftest sets HF_HUB_OFFLINE=1, which is what a machine without a connection amounts to
    # (without it, huggingface_hub retries for ~20 s before giving up with the same error).
    code = main(["train", "--data", "hf:no_such_dataset_zz:cfg", "--out", str(tmp_path / "run"), "--max-steps", "1",
                 "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "'no_such_dataset_zz'" in err and "connection" in err and "hf:/path/to/dir" in err
    with pytest.raises(FileNotFoundError, match="local dataset directory not found"):
        text_source(f"hf:{tmp_path / 'missing'}")


def test_failed_hub_requests_log_nothing_beside_the_error(monkeypatch, caplog):
    """Without HF_HUB_OFFLINE, huggingface_hub warns about each failed request before giving up: that
    warning is not a second line of the error."""
    import logging

    def load_dataset(name, config):
        logging.getLogger("huggingface_hub.utils._http").warning("'[Errno -2]' thrown while requesting HEAD")
        raise ConnectionError(f"Couldn't reach {name!r} on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with caplog.at_level(logging.WARNING), pytest.raises(FileNotFoundError, match="needs a connection"):
        text_source("hf:no_such_dataset_zz")
    assert not [r for r in caplog.records if "thrown while requesting" in r.getMessage()]
    assert logging.getLogger("huggingface_hub").level != logging.ERROR  # restored afterwards


def test_hub_name_and_config_reach_load_dataset(tmp_path, monkeypatch):
    """The online path, without the network: the Hub's train/validation/test splits are used as they are."""
    calls = []
    splits = {s: datasets.Dataset.from_dict({"text": _texts(s, 50)}) for s in ("train", "validation", "test")}

    def fake_load_dataset(name, config=None):
        calls.append((name, config))
        return datasets.DatasetDict(splits)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    src = text_source("hf:wikitext:wikitext-2-raw-v1")
    assert calls == [("wikitext", "wikitext-2-raw-v1")] and src.name == "hf:wikitext:wikitext-2-raw-v1"
    assert {s: _lines(src.blocks(s)) for s in ("train", "val", "test")} == {
        "train": set(_texts("train", 50)), "val": set(_texts("validation", 50)), "test": set(_texts("test", 50))}
    assert len(src.fingerprint) == 16
