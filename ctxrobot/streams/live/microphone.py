"""The live ``microphone`` source: PortAudio (ALSA, and PulseAudio or PipeWire through their
ALSA devices) via ``sounddevice``, delivered as the replay delivers audio: 16 kHz mono
int16 ``audio`` samples of ``chunk_ms``, each with an ``AudioLevel`` summary.

The device is asked for 16 kHz mono first, so a sound server or ALSA's ``plug`` layer
converts in C; a raw hardware device that refuses is opened at its own rate and channel
count, downmixed and resampled with soxr (a streaming resampler: no seams between blocks).

PortAudio calls back on its own real-time thread; the callback only copies the block and
stamps it. The source's thread cuts chunks and emits, so a slow consumer never stalls the
audio thread (PortAudio's overflows are counted as ``dropped_device``).
"""

from __future__ import annotations

import logging
import math
import queue
import time
from typing import Any

import numpy as np
import sounddevice as sd
import soxr

from ctxrobot.manifest.live import Microphone
from ctxrobot.model.events import AudioLevel
from ctxrobot.streams.live.device import DeviceError, DeviceSource
from ctxtask.datasets.speech import SAMPLE_RATE
from ctxtask.protocol import Sample

log = logging.getLogger(__name__)

__all__ = ["MicrophoneSource"]

SILENT_S = 2.0  # no block from PortAudio for this long: the device is gone
POLL_S = 0.2
RESYNC_S = 0.05  # stamps this far behind the arrival times: samples were lost, re-anchor
QUEUE_BLOCKS = 512  # ~50 s of 100 ms blocks between the audio thread and the source thread


class _Stamps:
    """Capture time of the newest sample, from a sample count and noisy arrival times.

    Between blocks the audio clock is exact (one sample is 1/16000 s) and arrival times
    only add scheduling delay, never subtract it: the stamp follows the sample count,
    pulled back to any arrival that shows it early, and re-anchored after lost samples.
    """

    def __init__(self) -> None:
        self.t_end: float | None = None

    def advance(self, samples: int, t_arrival: float) -> float:
        predicted = None if self.t_end is None else self.t_end + samples / SAMPLE_RATE
        if predicted is None or t_arrival < predicted or t_arrival - predicted > RESYNC_S:
            self.t_end = t_arrival
        else:
            self.t_end = predicted
        return self.t_end


class MicrophoneSource(DeviceSource):
    def __init__(self, name: str, spec: Microphone) -> None:
        super().__init__(name)
        self.spec = spec
        self.chunk = SAMPLE_RATE * spec.chunk_ms // 1000
        self._blocks: queue.Queue[tuple[np.ndarray, float, bool]] = queue.Queue(QUEUE_BLOCKS)
        self._stream: sd.InputStream | None = None
        self._resampler: soxr.ResampleStream | None = None
        self._channels = 1

    # -- the device -------------------------------------------------------------------------
    def _open(self) -> str:
        device = self._device()
        info = sd.query_devices(device, "input")
        label = f"{info['name']} (#{device})"
        try:
            self._stream = self._start(device, SAMPLE_RATE, 1)
            self._resampler = None
            self._channels = 1
            return f"{label} at {SAMPLE_RATE} Hz mono"
        except sd.PortAudioError:
            pass  # a raw device: take what it offers and convert here
        rate = int(info["default_samplerate"])
        self._channels = max(1, min(2, int(info["max_input_channels"])))
        try:
            self._stream = self._start(device, rate, self._channels)
        except sd.PortAudioError as exc:
            raise DeviceError(f"cannot record from {label}: {_first_line(exc)}") from exc
        self._resampler = soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="int16")
        return f"{label} at {rate} Hz × {self._channels}, resampled to {SAMPLE_RATE} Hz mono"

    def _device(self) -> int:
        """The PortAudio index of the configured device (refreshing the list once: PortAudio
        lists devices when it starts, so a microphone plugged in later is not in it)."""
        for attempt in range(2):
            try:
                if self.spec.device is None:
                    index = int(sd.default.device[0])
                    if index < 0:
                        raise ValueError("no default input device")
                    return index
                return int(sd.query_devices(self.spec.device, "input")["index"])
            except (ValueError, sd.PortAudioError) as exc:
                if attempt == 0:
                    # Re-scan devices. This restarts PortAudio: a robot has one microphone.
                    sd._terminate()
                    sd._initialize()
                    continue
                wanted = "a default input" if self.spec.device is None else repr(self.spec.device)
                names = ", ".join(
                    f"{d['index']}: {d['name']}"
                    for d in sd.query_devices()
                    if d["max_input_channels"] > 0
                )
                raise DeviceError(
                    f"no microphone {wanted}: {_first_line(exc)}; input devices: "
                    f"{names or 'none'} (is it plugged in? arecord -l)"
                ) from exc
        raise AssertionError("unreachable")

    def _start(self, device: int, rate: int, channels: int) -> sd.InputStream:
        blocksize = rate * self.spec.chunk_ms // 1000
        stream = sd.InputStream(
            device=device,
            samplerate=rate,
            channels=channels,
            dtype="int16",
            blocksize=blocksize,
            callback=self._callback,
        )
        try:
            stream.start()
        except sd.PortAudioError:
            stream.close()
            raise
        return stream

    def _close(self) -> None:
        if self._stream is not None:
            try:
                self._stream.abort()
                self._stream.close()
            except sd.PortAudioError:
                pass  # the device is gone already
            self._stream = None
        while not self._blocks.empty():
            self._blocks.get_nowait()

    def _callback(
        self, block: np.ndarray, frames: int, times: Any, status: sd.CallbackFlags
    ) -> None:
        """PortAudio's thread: copy and stamp, nothing else."""
        now = time.monotonic()
        # PortAudio's stream clock says how long ago the block's first sample was captured.
        delay = times.currentTime - times.inputBufferAdcTime
        first = now - delay if 0.0 <= delay < 1.0 else now - frames / self._rate()
        try:
            self._blocks.put_nowait((block.copy(), first, bool(status.input_overflow)))
        except queue.Full:
            self.stats.dropped_host += 1

    def _rate(self) -> float:
        return float(self._stream.samplerate) if self._stream is not None else SAMPLE_RATE

    # -- the source thread ------------------------------------------------------------------
    def _read(self) -> None:
        stamps = _Stamps()
        pending = np.empty(0, dtype=np.int16)
        last_block = time.monotonic()
        while not self._halted():
            try:
                block, first, overflow = self._blocks.get(timeout=POLL_S)
            except queue.Empty:
                stream = self._stream
                if time.monotonic() - last_block > SILENT_S or (stream and not stream.active):
                    raise DeviceError(
                        f"microphone {self.spec.device or 'default'} stopped delivering "
                        "audio: unplugged, or taken by another program?"
                    ) from None
                continue
            last_block = time.monotonic()
            self.stats.dropped_device += overflow
            pcm = self._convert(block)
            # The newest sample was captured one block length after the first.
            t_end = stamps.advance(len(pcm), first + len(block) / self._rate())
            pending = np.concatenate([pending, pcm])
            whole = len(pending) // self.chunk
            for k in range(whole):
                chunk = pending[k * self.chunk : (k + 1) * self.chunk]
                t_chunk = t_end - (len(pending) - (k + 1) * self.chunk) / SAMPLE_RATE
                self._send(chunk, t_chunk)
            pending = pending[whole * self.chunk :]

    def _convert(self, block: np.ndarray) -> np.ndarray:
        """A PortAudio block as 16 kHz mono int16."""
        if self._resampler is None:
            return block[:, 0]
        mono = block.mean(axis=1).astype(np.int16) if self._channels > 1 else block[:, 0]
        return self._resampler.resample_chunk(mono)

    def _send(self, chunk: np.ndarray, t_sensor: float) -> None:
        rms = float(np.sqrt(np.mean(chunk.astype(np.float64) ** 2)))
        rms_db = 20.0 * math.log10(max(rms, 1.0) / 32768.0)
        meta = {"rate": SAMPLE_RATE, "utterance": None}
        sample = Sample(0, t_sensor, "audio", meta, chunk.astype("<i2").tobytes())
        self._fire((("sensor.audio", AudioLevel(self.name, t_sensor, rms_db)),), sample)


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
