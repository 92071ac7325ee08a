"""Road-sign detection task: stop signs in camera frames, GTSRB classification of crops.

`signs.detector` finds stop signs (Haar cascade + red-octagon candidates, verified by the
43-class CNN in `signs.classifier`); `signs.task.SignsTask` serves it to the ctxrobot
runtime; `python -m signs.evaluate DATASET_DIR` measures it on the shared data.
"""
