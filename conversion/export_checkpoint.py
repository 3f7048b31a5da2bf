"""Export a CIM pre-training checkpoint as a Hub repo folder; the same as the ``cim-export``
command (``cim_models.hub.export``), kept for existing scripts.

    python conversion/export_checkpoint.py --checkpoint RUN/checkpoint-N --out DIR [...]
"""

import sys

from cim_models.hub.export import main

if __name__ == "__main__":
    sys.exit(main())
