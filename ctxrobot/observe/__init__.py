"""What a run leaves and shows: the one observer pipeline, the run database (writer and
readers), Prometheus metrics, the live status document, plots, traces and the dashboard.
Imports `model` only.
"""
