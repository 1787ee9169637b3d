"""``python train_clip.py --help``: train the CLIP text encoder. The command lives in ``ldm/cli/train_clip.py``."""

from ldm.cli.train_clip import entry

if __name__ == "__main__":
    entry()
