"""Serving benchmark for any OpenAI-compatible server: load generation, statistics, report and plots."""
