"""Differential privacy: mechanisms (``central``) and their accounting (``accounting``)."""
