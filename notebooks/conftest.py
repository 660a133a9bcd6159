"""nbval runs the notebooks in text mode: the same deterministic outputs that are saved in them."""

import os

os.environ["DSPEX_NONINTERACTIVE"] = "1"
