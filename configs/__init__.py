"""Training configurations: `python train.py --config configs/NAME.py` (see each file's docstring)."""
