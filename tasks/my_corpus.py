"""A folder of your own .txt files as a pretraining task: copy this file and edit FOLDER.

    t5x-like train --config t5_span_corruption.py:small --workdir runs/mine \
        --config.data.task_modules=tasks.my_corpus --config.data.task=my_corpus

Every non-blank line of every .txt file under FOLDER is one example (read into memory when
this module is imported); a stable hash of each line puts 1% of them in ``validation``.
``$MY_CORPUS`` overrides the folder without editing the file.
"""

import os

from t5x_like.tasks import register_text_task

TASK = "my_corpus"
FOLDER = os.environ.get("MY_CORPUS", "data/my_corpus")

register_text_task(TASK, FOLDER, validation_fraction=0.01)
