#!/usr/bin/env python
"""Fine-tune a segmenter (UNETR on an MAE encoder, or a U-Net baseline) on image + mask pairs.

    python run_segmentation.py --config configs/<file>.yaml [--key value ...]
    accelerate launch run_segmentation.py --config ...   # many processes, unchanged

The same as the console command `medmae-segment`; the task itself lives in `hf_medmae/tasks/segment.py`.
"""

from hf_medmae.tasks.segment import cli

if __name__ == "__main__":
    cli()
