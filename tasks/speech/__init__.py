"""Speech-recognition task: voice-activity detection plus PocketSphinx or Vosk.

Modules: ``vad`` (utterance segmentation), ``recognizer`` (the engine interface and factory),
``pocketsphinx_engine`` / ``vosk_engine`` (the engines), ``commands`` (the robot command
grammar), ``stream`` (chunks → utterances), ``task`` (the ctxrobot task), ``evaluate`` (WER and
real-time factor on a dataset folder), ``tune`` (the dictation settings by cross-validation).
"""
