"""Example task modules to copy and edit; a config imports them with
``--config.data.task_modules=tasks.c4`` (see t5x_like.experiment.import_task_modules)."""
