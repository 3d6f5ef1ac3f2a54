import subprocess
import sys

import pytest

from dynsparse import __version__
from dynsparse.cli import main


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert __version__ in capsys.readouterr().out
    assert main([]) == 0
    assert "usage: dynsparse" in capsys.readouterr().out


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "dynsparse.cli", "--help"], capture_output=True, text=True, check=True)
    assert "Dynamic activation sparsity" in out.stdout


def test_unknown_command_is_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["no-such-command"])
    assert e.value.code == 2


def test_lazy_top_level_api():
    import dynsparse

    assert callable(dynsparse.sparsify_) and dynsparse.MGSConfig and dynsparse.SIBSConfig
    assert dynsparse.DynSparseLMForCausalLM.__name__ == "DynSparseLMForCausalLM"
    assert "sparsify_" in dir(dynsparse)
    with pytest.raises(AttributeError):
        dynsparse.no_such_name


def test_import_registers_auto_classes(tmp_path):
    import dynsparse
    from transformers import AutoModelForCausalLM

    model = dynsparse.DynSparseLMForCausalLM(dynsparse.preset_config("tiny", hidden_size=32, num_hidden_layers=1,
                                                                     num_attention_heads=2, vocab_size=64))
    model.save_pretrained(tmp_path)
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path)).__name__ == "DynSparseLMForCausalLM"
    assert dynsparse.TrainConfig.__name__ == "TrainConfig" and callable(dynsparse.evaluate_lm)
