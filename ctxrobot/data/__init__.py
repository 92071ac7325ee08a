"""Data the tasks are judged on: `ctxrobot data fetch` (public originals, verified, derived
into the shared layout). May import `ctxtask` and the standard library; nothing of the runtime.
"""
