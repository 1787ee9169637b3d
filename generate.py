"""``python generate.py --help``: text to images with a model bundle. The command lives in ``ldm/cli/generate.py``."""

from ldm.cli.generate import entry

if __name__ == "__main__":
    entry()
