"""C4 (English, TFDS ``c4/en:3.1.0``) as a pretraining task for T5's span corruption.

    t5x-like train --config t5_span_corruption.py:base --workdir gs://BUCKET/runs/c4 \
        --config.data.task_modules=tasks.c4 --config.data.task=c4_en \
        --config.data.vocab_path=gs://t5-data/vocabs/cc_all.32000.100extra/sentencepiece.model

The TFDS data must be prepared first (``tfds build c4/en`` runs an Apache Beam pipeline of
several hundred GB; point ``TFDS_DATA_DIR`` at a bucket that holds it). C4 has its own
``validation`` split, so none is carved out of ``train``. Span corruption itself runs on
device (``objective`` in the config), so this module only names the text source.
"""

from t5x_like.tasks import register_text_task

TASK = "c4_en"
SOURCE = "tfds:c4/en:3.1.0"
# T5's C4 vocabulary (32000 pieces; seqio adds 100 sentinels): a config's data.vocab_path
T5_VOCABULARY = "gs://t5-data/vocabs/cc_all.32000.100extra/sentencepiece.model"

register_text_task(TASK, SOURCE, text_key="text", validation_fraction=None)
