"""The one training loop and its parts: optimizer and schedule (optim.py), resumable state (checkpoint.py),
the loop itself (loop.py). Model-agnostic: it takes a model, a batch function and a loss function."""
