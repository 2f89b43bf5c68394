"""A process that leaves a batch generator open until the interpreter exits ends quietly.

Regression: an open ``raw_token_batches`` generator, finalised during interpreter shutdown
after TensorFlow's module was torn down, printed ``AttributeError: 'NoneType' object has no
attribute 'NotFoundError'`` from the pipeline's error handling. No traceback at exit, ever.
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import sys
from pathlib import Path

from t5x_like import tasks
from t5x_like.data.pipeline import raw_token_batches

folder = Path(sys.argv[1])
(folder / "all.txt").write_text("".join(f"Line {i}: a fox ran past the hill.\\n"
                                        for i in range(200)))
tasks.register_text_task("clean_exit_text", str(folder), validation_fraction=0.05)
OPEN = raw_token_batches("clean_exit_text", split="train", raw_length=16, batch_size=2,
                         seed=0)
batch = next(OPEN)
print("batch", batch["tokens"].shape, flush=True)
# OPEN stays referenced and unfinished: the interpreter finalises it at shutdown.
"""


def test_open_generator_at_exit_prints_no_traceback(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "T5X_LIKE_CACHE": os.environ.get("T5X_LIKE_CACHE", str(ROOT / ".cache/t5x_like"))}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "batch (2, 16)" in done.stdout
    for marker in ("Traceback", "Exception ignored", "Error:"):
        assert marker not in done.stderr, done.stderr[-3000:]
