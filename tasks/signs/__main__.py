"""`python -m signs`: serve the road-sign task on the runtime's socket (container entry)."""

from ctxtask.runner import serve
from signs.task import SignsTask

serve(SignsTask())
