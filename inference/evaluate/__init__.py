"""Evaluation of screening models on labelled data, for researchers."""
