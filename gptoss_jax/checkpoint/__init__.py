"""Checkpoint layouts: tensor names, writers, random weights."""
