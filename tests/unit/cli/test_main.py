"""The ``kvpool`` entry point as a shell runs it."""

from __future__ import annotations

import os
import subprocess
import sys


def test_a_reader_that_goes_away_is_no_traceback():
    # `kvpool ... | head` closes the pipe early; here it is closed before the first write.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([sys.executable, "-m", "kvpool", "completion", "bash"], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write_end)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 141, (proc.returncode, proc.stderr)
