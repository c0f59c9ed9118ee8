"""Notebook infrastructure: the batch runner and its command line, figures, progress bars."""
