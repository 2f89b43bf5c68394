"""Fine-tuning from a pretrained checkpoint: task heads, parameter-efficient methods, modes.

    heads.py       sequence classification / regression, token classification, span QA;
                   feature-based read-out (one layer or a learned weighted sum of layers)
    peft.py        LoRA, adapters, prompt tuning, prefix tuning (installed around the modules)
    modes.py       which parameters train per mode; frozen ones get no update and no state;
                   gradual unfreezing
    checkpoint.py  only the trainable part is saved in frozen-model modes; merged on load
    data.py        labelled-example batches from seqio tasks, one example a row or packed
    packing.py     several examples a row: first-fit-decreasing, segment ids and positions

The families that use them are in ``t5x_like.families.finetune`` (t5_finetune,
bart_finetune, bert_finetune).
"""

from t5x_like.finetune.modes import MODES, PEFT_MODES

__all__ = ["MODES", "PEFT_MODES"]
