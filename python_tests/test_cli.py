"""The command table: every sub-command builds its parser and answers --help; unknown commands fail clearly."""
import subprocess
import sys

import pytest

from mtrobust_fast import cli


@pytest.mark.parametrize("words", [words for words, _, _ in cli.COMMANDS], ids=" ".join)
def test_every_command_has_help(words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*words, "--help"])
    assert exit_info.value.code == 0
    assert "usage: mtrobust-fast " + " ".join(words) in capsys.readouterr().out


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert all(words[0] in out for words, _, _ in cli.COMMANDS)


def test_unknown_command_is_an_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["attak"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["select", "report"])
def test_table_commands_start_without_torch(command):
    """Commands that only read results tables import neither torch nor the other commands' modules."""
    code = ("import sys\nfrom mtrobust_fast.cli import main\ntry:\n    main([%r, '--help'])\nexcept SystemExit:\n"
            "    pass\nprint('torch' in sys.modules)" % command)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "False"
