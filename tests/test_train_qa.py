"""QA fine-tuning: answer-only loss masks, bad records, and a short fine-tune that lowers the answer loss."""
import json

import pytest

from dynsparse.cli import main
from dynsparse.data import train_bpe
from dynsparse.data.qa import IGNORE, QAData, load_qa
from dynsparse.train.telemetry import read_jsonl

COLORS = ["red", "blue", "green", "gold"]


def write_qa(path, n=40):
    with path.open("w") as f:
        for i in range(n):
            c = COLORS[i % 4]
            f.write(json.dumps({"context": f"The king wore a {c} cloak.", "question": "What colour was the cloak?",
                                "answer": c}) + "\n")


def test_rows_mask_everything_but_the_answer(tmp_path):
    write_qa(tmp_path / "qa.jsonl", 12)
    tok = train_bpe(["The king wore a red cloak. Question: Answer: blue green gold"] * 5, 300)
    data = QAData(tmp_path / "qa.jsonl", tok, seq_len=48)
    x, y = data.splits["train"]
    assert x.shape == (10, 48) and len(data.splits["val"][0]) == 2  # records 0 and 10 held out
    answer_ids = y[0][y[0] != IGNORE].tolist()
    assert tok.decode(answer_ids) == " blue" + tok.eos_token  # record 1's answer, then eos


def test_bad_qa_records(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"context": "c", "question": "q"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: .*answer"):
        load_qa(tmp_path / "bad.jsonl")
    with pytest.raises(FileNotFoundError):
        load_qa(tmp_path / "none.jsonl")


def test_qa_finetune_lowers_answer_loss(tmp_path, capsys):
    (tmp_path / "c.txt").write_text("".join(f"The king wore a {COLORS[i % 4]} cloak, line {i}.\n" for i in range(400)))
    common = ["--seq-len", "32", "--batch-size", "8", "--cache-dir", str(tmp_path / "cache"), "--no-progress",
              "--warmup-steps", "1"]
    assert main(["train", "--data", str(tmp_path / "c.txt"), "--vocab-size", "300", "--max-steps", "2",
                 "--d-model", "32", "--n-layer", "1", "--n-head", "2", "--out", str(tmp_path / "base"), *common]) == 0
    write_qa(tmp_path / "qa.jsonl")
    code = main(["train", "--init-from", str(tmp_path / "base" / "final"), "--qa", str(tmp_path / "qa.jsonl"),
                 "--max-steps", "12", "--eval-every", "1", "--lr", "1e-2", "--out", str(tmp_path / "qa"), *common])
    assert code == 0, capsys.readouterr().err
    vals = [r["val_loss"] for r in read_jsonl(tmp_path / "qa" / "metrics.jsonl") if "val_loss" in r]
    assert len(vals) == 12 and vals[-1] < vals[0]
    assert (tmp_path / "qa" / "final" / "tokenizer.json").exists()


def test_qa_needs_a_tokenizer(tmp_path, capsys):
    write_qa(tmp_path / "qa.jsonl")
    assert main(["train", "--qa", str(tmp_path / "qa.jsonl"), "--out", str(tmp_path / "r"), "--max-steps", "1"]) == 2
    assert "tokenizer" in capsys.readouterr().err
