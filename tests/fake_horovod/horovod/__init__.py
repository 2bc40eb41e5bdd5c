"""Test stand-in for Horovod (see horovod/torch.py)."""
