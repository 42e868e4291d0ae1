"""Suite-wide settings: nothing in the tests may reach the network (set before huggingface_hub reads it)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
