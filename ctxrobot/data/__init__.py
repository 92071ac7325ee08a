"""The shared data folder's catalogue and `ctxrobot data fetch`, which rebuilds it from public
originals. May import only the standard library, third-party packages and `ctxtask`.
"""
