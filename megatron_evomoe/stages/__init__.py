"""Stages as configuration (ARCHITECTURE 4.1): the model's structure in each stage (structure.py),
its trainable set (trainable.py) and its size (size.py). Above model/ and moe/, below parallel/
and training/, which both use it."""
