"""The CLI's ``error:`` sentence is a line of its own even while other threads print.

Regression: a checkpoint save failing on a full disk left orbax and tensorstore threads
printing tracebacks piece by piece (off a terminal each ``sys.stderr.write`` is one system
call); the CLI's ``print`` of the sentence landed inside one of their lines, so no line of
stderr began with ``error:``.
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import sys
import threading

from t5x_like.errors import print_error

done = threading.Event()


def traceback_in_pieces():  # as Python prints an exception line: type, ": ", message, newline
    while not done.is_set():
        for piece in ("RuntimeError", ": ", "Event loop is closed", "\\n"):
            sys.stderr.write(piece)


noise = threading.Thread(target=traceback_in_pieces)
noise.start()
for i in range(1000):
    print_error(f"sentence {i}")
done.set()
noise.join()
"""


def test_error_sentences_stay_whole_lines_beside_a_printing_thread():
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stderr.splitlines()
    assert sum(line.startswith("RuntimeError") for line in lines) > 0  # the noise was there
    whole = {line for line in lines if line.startswith("error: ")}
    assert whole == {f"error: sentence {i}" for i in range(1000)}
