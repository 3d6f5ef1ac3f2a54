"""Corpora a user may hand over by mistake: a binary file (warned, fresh or cached), a line without spaces
(BPE training bounded), a dataset script (never run), a JSONL file that is not UTF-8."""
import random
import time

import pytest

from dynsparse.data import prepare_tokens, text_source
from dynsparse.data import text as text_mod
from dynsparse.data.tokenizer import MAX_WORD_CHARS, _bounded_words, train_bpe


def test_binary_corpus_warns_with_its_share_fresh_and_cached(tmp_path, capsys):
    f = tmp_path / "blob.txt"
    good = "".join(f"line {i} of ordinary text\n" for i in range(200))
    f.write_bytes(good.encode() + bytes(range(128, 256)) * 20)
    share = 2560 / (len(good) + 2560)  # every byte >= 0x80 here is invalid UTF-8 on its own
    text_mod._WARNED.clear()
    prepare_tokens(text_source(str(f)), 260, cache_dir=tmp_path / "cache")
    err = capsys.readouterr().err
    assert f"{share:.1%} of its bytes are not valid UTF-8" in err and str(f) in err
    text_mod._WARNED.clear()  # a later run, served from the token cache, warns too
    prepare_tokens(text_source(str(f)), 260, cache_dir=tmp_path / "cache")
    assert f"{share:.1%} of its bytes are not valid UTF-8" in capsys.readouterr().err


def test_text_with_a_few_odd_bytes_or_real_replacement_characters_does_not_warn(tmp_path, capsys):
    f = tmp_path / "ok.txt"
    f.write_bytes(("".join(f"line {i} \ufffd text\n" for i in range(300))).encode() + b"\xff")
    text_mod._WARNED.clear()
    prepare_tokens(text_source(str(f)), 260, cache_dir=tmp_path / "cache")
    assert "not valid UTF-8" not in capsys.readouterr().err


def test_long_words_are_cut_for_bpe_training_only():
    run = "x" * (3 * MAX_WORD_CHARS + 5)
    pieces = list(_bounded_words(["plain words stay whole", f"a {run} b"]))
    assert pieces[0] == "plain words stay whole"
    assert "".join(pieces[1:]) == f"a {run} b" and max(len(p) for p in pieces) <= MAX_WORD_CHARS


def test_bpe_on_a_megabyte_line_without_spaces_finishes(tmp_path):
    rng = random.Random(0)
    line = "".join(rng.choice("abcdefghij") for _ in range(1_000_000))
    t0 = time.perf_counter()
    tok = train_bpe([line], 300)
    assert time.perf_counter() - t0 < 60  # quadratic in the word length before: hours for a few MB
    ids = tok(line[:10_000], add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == line[:10_000]  # the tokenizer still encodes the whole line losslessly


def test_dataset_script_is_refused_not_run(tmp_path):
    d = tmp_path / "ds"
    d.mkdir()
    (d / "ds.py").write_text(f"open({str(tmp_path / 'RAN')!r}, 'w').write('x')\n")
    with pytest.raises(ValueError, match="cannot load the HF dataset"):
        text_source(f"hf:{d}")
    assert not (tmp_path / "RAN").exists()


def test_jsonl_that_is_not_utf8_names_the_line(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_bytes(b'{"text": "fine"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(ValueError, match=r"c.jsonl:2: not UTF-8"):
        list(text_source(str(f)).blocks("train"))
