"""Container entry point: serve the SLAM task on the runtime's socket."""

from ctxtask.runner import serve
from slam.task import SlamTask

serve(SlamTask())
