"""clip-kd: distil a teacher CLIP into a student CLIP on top of open_clip.

Importing the package registers the model configs shipped in `training/model_configs/` with open_clip, so
`open_clip.create_model_and_transforms("ViT-T-16", pretrained=...)` works after `import training`.
"""

from pathlib import Path

import open_clip

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
if MODEL_CONFIG_DIR not in open_clip.factory._MODEL_CONFIG_PATHS:
    open_clip.add_model_config(MODEL_CONFIG_DIR)

__version__ = "0.1.0"
