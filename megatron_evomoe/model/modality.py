"""Per-token modality ids read by the routers (ARCHITECTURE 3, 4.3)."""
TEXT = 0
IMAGE = 1
NUM_MODALITIES = 2
NAMES = {TEXT: "text", IMAGE: "image"}
