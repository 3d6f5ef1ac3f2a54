import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """The built-in SmolLM2-135M converted once per test session through ``resolve_model`` into a fresh
    cache, with the logits of transformers' own GGUF load on a few tokens kept as the reference."""
    import time
    from types import SimpleNamespace

    from dynsparse.lm import pretrained

    cache = tmp_path_factory.mktemp("dynsparse-cache") / "models"  # $DYNSPARSE_CACHE/models layout
    loaded = []
    real_load = pretrained.load_gguf

    def load_and_keep(path):
        model, tokenizer = real_load(path)
        loaded.append((model, tokenizer))
        return model, tokenizer

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pretrained, "load_gguf", load_and_keep)
        t0 = time.perf_counter()
        path = pretrained.resolve_model("smollm2-135m", cache_dir=cache)
        seconds = time.perf_counter() - t0
    assert len(loaded) == 1, "the conversion should load the GGUF file exactly once"
    model, tokenizer = loaded.pop()
    ids = tokenizer("The capital of France is Paris. The capital of Italy is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    digests = tensor_digests(model)
    del model
    return SimpleNamespace(dir=path, cache=cache, convert_seconds=seconds, ids=ids, gguf_logits=logits,
                           gguf_digests=digests, gguf_tokenizer=tokenizer)


def tensor_digests(model):
    """sha256 of every parameter and buffer's bytes: a bit-exact fingerprint that costs no memory to keep."""
    import hashlib

    return {name: hashlib.sha256(t.detach().contiguous().cpu().numpy().tobytes()).hexdigest()
            for name, t in model.state_dict().items()}
