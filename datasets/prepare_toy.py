#!/usr/bin/env python
"""Generate the built-in toy instance-segmentation dataset (no download).

Example::

    python datasets/prepare_toy.py --output datasets/toy --num-train 64 --num-val 16 --size 192 --seed 0

Writes ``annotations/instances_{train,val}.json`` and ``train/``, ``val/`` JPEG images;
the catalog names ``toy_train`` and ``toy_val`` point there (under ``$MAEDET_DATASETS``).
The output is a deterministic function of the arguments.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from maedet.data.toy import _main  # noqa: E402

if __name__ == "__main__":
    _main()
