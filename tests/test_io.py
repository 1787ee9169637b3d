"""ldm.io: atomic writes, and the cleaning up of what a killed write leaves behind."""

import signal
import subprocess
import sys
from pathlib import Path

from ldm.io import atomic_write, remove_stale_temps

KILLED_WRITE = """
import os, signal, sys
from pathlib import Path
from ldm.io import atomic_write

def write(tmp: Path):
    tmp.write_bytes(b"half a checkpoint")
    os.kill(os.getpid(), signal.SIGKILL)  # as a machine or a user would, midway

atomic_write(Path(sys.argv[1]), write)
"""


def test_a_killed_write_leaves_the_old_file_and_a_temp_that_the_next_start_removes(tmp_path):
    target = tmp_path / "checkpoints" / "step-00000003.safetensors"
    atomic_write(target, lambda tmp: tmp.write_bytes(b"the old checkpoint"))
    result = subprocess.run([sys.executable, "-c", KILLED_WRITE, str(target)], capture_output=True, timeout=120)
    assert result.returncode == -signal.SIGKILL
    assert target.read_bytes() == b"the old checkpoint"
    (left,) = [p for p in target.parent.iterdir() if p != target]
    assert left.name.startswith(".step-00000003.safetensors.") and left.name.endswith(".tmp")

    keep = [tmp_path / "notes.tmp", tmp_path / ".cache.tmp", tmp_path / "samples" / "grid.png"]  # not ours
    for path in keep:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    assert remove_stale_temps(tmp_path) == [left]
    assert not left.exists() and all(path.exists() for path in keep) and target.exists()
    assert remove_stale_temps(tmp_path) == [] and remove_stale_temps(tmp_path / "nowhere") == []


def test_a_run_that_starts_again_removes_the_temps_and_says_so(tmp_path, capsys):
    from accelerate import Accelerator

    from ldm.train.loop import Progress, TrainingState, begin_run

    stale = tmp_path / "checkpoints" / ".step-00000002.safetensors.k3j_9x0a.tmp"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"x" * 1000)
    accelerator = Accelerator(cpu=True)
    state = TrainingState(models={}, optimizers={}, schedulers={}, emas={}, progress=Progress())
    begin_run(accelerator, state, config={"x": 1}, resume=None, output_dir=tmp_path, name="t")
    assert not stale.exists()
    assert "removed 1 temp file(s) that interrupted writes left in" in capsys.readouterr().out
    assert Path(tmp_path / "config.yaml").is_file()
