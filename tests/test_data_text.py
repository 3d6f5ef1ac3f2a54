"""Corpora: built-in Shakespeare splits, user text/JSONL, BPE tokenizer, memmap tokens, batches."""
import json

import numpy as np
import pytest
import torch

from dynsparse.data import (EOS_TEXT, eval_windows, load_tokenizer, prepare_tokens, sample_windows, spread_windows,
                            text_source, train_bpe)
from dynsparse.data import shakespeare


def test_shakespeare_holds_out_whole_plays():
    splits = shakespeare.shakespeare_splits()
    names = {s: {n for n, _ in plays} for s, plays in splits.items()}
    assert names["val"] == set(shakespeare.VAL_PLAYS) and names["test"] == set(shakespeare.TEST_PLAYS)
    assert not (names["train"] & names["val"]) and not (names["train"] & names["test"])
    assert len(names["train"]) + 4 == len(shakespeare.play_files()) >= 38
    text = dict(splits["test"])["macbeth"]
    assert text.startswith("Macbeth") and "**" not in text and "MACBETH:" in text


def test_speeches_parse_speaker_and_lines():
    md = "# P\n\n**BERNARDO**  \nWho's there?\n\n**FRANCISCO**  \nNay, answer me:  \nstand.\n\n_Exit_\n"
    assert shakespeare.speeches(md) == [("BERNARDO", "Who's there?"), ("FRANCISCO", "Nay, answer me: stand.")]


def _write_corpus(tmp_path, n_lines=400):
    lines = [f"line {i} of the little corpus, with words like king and queen." for i in range(n_lines)]
    (tmp_path / "a.txt").write_text("\n".join(lines[: n_lines // 2]) + "\n")
    with (tmp_path / "b.jsonl").open("w") as f:
        for line in lines[n_lines // 2 :]:
            f.write(json.dumps({"text": line}) + "\n")
    return lines


def test_user_corpus_splits_without_overlap(tmp_path):
    _write_corpus(tmp_path)
    src = text_source(str(tmp_path))
    blocks = {s: list(src.blocks(s)) for s in ("train", "val", "test")}
    assert all(blocks.values())
    lines = {s: {l.replace(EOS_TEXT, "") for b in bl for l in b.splitlines()} for s, bl in blocks.items()}
    assert not (lines["train"] & lines["val"]) and not (lines["val"] & lines["test"])
    total = sum(len(b) for bl in blocks.values() for b in bl)
    assert sum(len(b) for b in blocks["train"]) > 0.8 * total


def test_tokens_memmap_roundtrip_and_cache(tmp_path):
    (tmp_path / "corpus").mkdir()
    _write_corpus(tmp_path / "corpus")
    src = text_source(str(tmp_path / "corpus"))
    data = prepare_tokens(src, vocab_size=300, cache_dir=tmp_path / "cache")
    assert isinstance(data.splits["train"], np.memmap) and data.vocab_size == 300
    text = data.tokenizer.decode(data.splits["train"].tolist())
    assert text == "".join(src.blocks("train"))  # byte-level BPE is lossless
    again = prepare_tokens(src, vocab_size=300, cache_dir=tmp_path / "cache")
    assert again.path == data.path and len(list((tmp_path / "cache").iterdir())) == 1
    # A saved tokenizer directory can be used instead of training one.
    data.tokenizer.save_pretrained(tmp_path / "tok")
    other = prepare_tokens(src, tokenizer_dir=str(tmp_path / "tok"), cache_dir=tmp_path / "cache")
    assert other.path != data.path and np.array_equal(other.splits["val"], data.splits["val"])


def test_spread_windows_cover_the_split_evenly():
    tokens = np.arange(1000)
    ids = spread_windows(tokens, 100, 10)
    assert ids.shape == (10, 10) and ids.dtype == torch.int64
    assert ids[0, 0] == 0 and ids[-1, -1] == 999  # first and last windows touch both ends
    assert all(torch.equal(row, torch.arange(row[0], row[0] + 10)) for row in ids)  # each window contiguous
    gaps = ids[1:, 0] - ids[:-1, 0]
    assert int(gaps.max()) - int(gaps.min()) <= 1 and int(gaps.min()) > 10  # evenly spaced, not a prefix
    assert spread_windows(tokens[:30], 100, 10).shape == (3, 10)  # fewer tokens than asked: all of them
    assert spread_windows(tokens, 5, 10).shape == (1, 5)  # a window no longer than what was asked for
    with pytest.raises(ValueError, match="no windows to take"):
        spread_windows(tokens[:0], 100, 10)


def test_sample_windows_deterministic_and_shifted():
    tokens = np.arange(1000, dtype=np.uint16)
    x, y = sample_windows(tokens, 4, 16, seed=3, step=7)
    x2, _ = sample_windows(tokens, 4, 16, seed=3, step=7)
    x3, _ = sample_windows(tokens, 4, 16, seed=3, step=8)
    assert torch.equal(x, x2) and not torch.equal(x, x3)
    assert torch.equal(y[:, :-1], x[:, 1:]) and x.dtype == torch.int64
    ex, ey = eval_windows(tokens, 10)
    assert ex.shape == (99, 10) and torch.equal(ey, ex + 1)


def test_bpe_handles_any_bytes():
    tok = train_bpe(["hello world " * 50, "ünïcödé ✓"], vocab_size=280)
    s = "never seen: \x00 ✓ 日本"
    assert tok.decode(tok(s)["input_ids"]) == s
    assert tok(EOS_TEXT)["input_ids"] == [tok.eos_token_id]


@pytest.mark.parametrize("content,match", [(None, "not found"), ("", "empty")])
def test_bad_corpus(tmp_path, content, match):
    path = tmp_path / "c.txt"
    if content is not None:
        path.write_text(content)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        text_source(str(path))


def test_bad_jsonl_names_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"c.jsonl:2: .*\"text\""):
        list(text_source(str(path)).blocks("train"))


def test_corpus_smaller_than_one_sequence(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "t.txt").write_text("".join(f"short line {i}\n" for i in range(60)))
    data = prepare_tokens(text_source(str(tmp_path / "c")), vocab_size=260, cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="fewer than one sequence"):
        data.check_length(10_000)


def test_missing_tokenizer_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer directory"):
        load_tokenizer(tmp_path / "nope")
