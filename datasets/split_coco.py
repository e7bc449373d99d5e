#!/usr/bin/env python
"""Split a COCO json into disjoint training and held-out images (no image is copied).

Example (the default: fruits_nuts from $MAEDET_TEST_DATA, one image in 3 held out)::

    python datasets/split_coco.py --output datasets/fruits_nuts_split/annotations --every 3 --offset 2

Writes ``train.json`` and ``heldout.json``; the catalog names ``fruits_nuts_train``
and ``fruits_nuts_heldout`` read them from ``$MAEDET_DATASETS/fruits_nuts_split`` with
the images of ``$MAEDET_TEST_DATA/fruits_nuts/images``. The output is a deterministic
function of the arguments (images ordered by id, every EVERY-th from OFFSET held out).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from maedet.data.split import _main  # noqa: E402

if __name__ == "__main__":
    _main()
