"""`python -m speech`: serve the speech task on the runtime's socket (container entry)."""

from ctxtask.runner import serve
from speech.task import SpeechTask

serve(SpeechTask())
