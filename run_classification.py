#!/usr/bin/env python
"""Fine-tune (or linearly probe) an MAE encoder, or the same ViT from scratch, on labelled images.

    python run_classification.py --config configs/<file>.yaml [--key value ...]
    accelerate launch run_classification.py --config ...   # many processes, unchanged

The same as the console command `medmae-classify`; the task itself lives in `hf_medmae/tasks/classify.py`.
"""

from hf_medmae.tasks.classify import cli

if __name__ == "__main__":
    cli()
