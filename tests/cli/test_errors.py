"""ldm.errors: one-line errors from the command-line wrapper, and exit_now."""

import os
import subprocess
import sys

import pytest

from ldm.cli.common import run_cli
from ldm.errors import LdmError


def test_run_cli_turns_ldm_errors_into_one_line(capsys):
    def main(argv):
        raise LdmError("no prompt given; try: python generate.py \"red apple\"")

    assert run_cli(main, []) == 2
    assert capsys.readouterr().err == 'error: no prompt given; try: python generate.py "red apple"\n'


@pytest.mark.parametrize("code", [0, 3])
def test_exit_now_delivers_buffered_output_and_the_status(code):
    # Piped stdout is block-buffered: without the flush, os._exit would drop these lines.
    script = f"import sys\nfrom ldm.cli.common import exit_now\nprint('out')\nsys.stderr.write('err')\nexit_now({code})\nprint('never')"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert (result.returncode, result.stdout, result.stderr) == (code, "out\n", "err")
