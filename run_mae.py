#!/usr/bin/env python
"""Pre-train a masked autoencoder on unlabeled images.

    python run_mae.py --config configs/<file>.yaml [--key value ...]
    accelerate launch run_mae.py --config ...   # many processes, unchanged

The same as the console command `medmae-pretrain`; the task itself lives in `hf_medmae/tasks/pretrain.py`.
"""

from hf_medmae.tasks.pretrain import cli

if __name__ == "__main__":
    cli()
