"""Publish a folder written by ``cim-export`` to the Hugging Face Hub; the same as the
``cim-push`` command (``cim_models.hub.publish``), kept for existing scripts.

    python conversion/push_to_hub.py --folder DIR --repo-id ORG/NAME [...]
"""

import sys

from cim_models.hub.publish import main

if __name__ == "__main__":
    sys.exit(main())
