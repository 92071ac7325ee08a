"""Road-sign detection task: stop signs in camera frames, GTSRB classification of crops.

`signs.detector` finds stop signs (Haar cascade + red-region candidates, verified by the
43-class CNN in `signs.classifier`); `signs.task.SignsTask` serves it to the ctxrobot
runtime; `python -m signs.evaluate DATASET_DIR` measures it on a dataset folder and
`python -m signs.tune DATASET_DIR` chooses its thresholds by cross-validation.
"""

import os

# The task runs on one core. numpy's OpenBLAS would start a thread per core for the
# classifier's dense head and spin them against the scheduler's CPU share: 3-4x the CPU
# time of one thread on a loaded 2-core machine. This takes effect when `signs` is imported
# before numpy, as in `python -m signs` and `python -m signs.evaluate`.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
