"""ldm.cli.common: one-line errors from the command-line wrapper, the net for the unexpected, and exit_now."""

import os
import subprocess
import sys

import pytest

from ldm.cli.common import EXIT_INTERNAL, ArgumentParser, run_cli
from ldm.errors import LdmError


def test_run_cli_turns_ldm_errors_into_one_line(capsys):
    def main(argv):
        raise LdmError("no prompt given; try: python generate.py \"red apple\"")

    assert run_cli(main, []) == 2
    assert capsys.readouterr().err == 'error: no prompt given; try: python generate.py "red apple"\n'


def crashing_main(argv):
    """A command with a defect: it parses its flags, then fails in a way no check foresaw."""
    ArgumentParser(prog="demo").parse_args(argv)
    raise KeyError("spline\nreticulation " + "x" * 2000)


def test_an_unexpected_exception_is_one_line_and_status_70(capsys):
    assert run_cli(crashing_main, []) == EXIT_INTERNAL == 70
    err = capsys.readouterr().err
    assert err.startswith("error: internal error: KeyError: ") and err.count("\n") == 1
    assert err.rstrip().endswith("please report it with --debug's traceback") and len(err) < 500
    assert "Traceback" not in err


def test_debug_shows_the_traceback(capsys):
    assert run_cli(crashing_main, ["--debug"]) == EXIT_INTERNAL
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and "in crashing_main" in err
    assert err.splitlines()[-1].startswith("error: internal error: KeyError: ")


def test_every_command_takes_debug():
    """--debug reaches every command's parser, so that its --help lists it and parsing accepts it."""
    from ldm.cli import COMMANDS

    for name, (module, _) in COMMANDS.items():
        parser = __import__(module, fromlist=["build_parser"]).build_parser()
        assert "--debug" in parser.format_help(), name


@pytest.mark.parametrize("code", [0, 3])
def test_exit_now_delivers_buffered_output_and_the_status(code):
    # Piped stdout is block-buffered: without the flush, os._exit would drop these lines.
    script = f"import sys\nfrom ldm.cli.common import exit_now\nprint('out')\nsys.stderr.write('err')\nexit_now({code})\nprint('never')"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert (result.returncode, result.stdout, result.stderr) == (code, "out\n", "err")
