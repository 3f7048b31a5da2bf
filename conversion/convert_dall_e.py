"""Convert OpenAI's DALL-E dVAE pickles to safetensors: the ``cim-convert-dall-e`` command.

    python conversion/convert_dall_e.py --encoder encoder.pkl --decoder decoder.pkl --out DIR

Kept for checkouts; the code is ``cim_models.hub.convert_dall_e``. ``--help`` lists every option.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from cim_models.hub.convert_dall_e import main

if __name__ == "__main__":
    sys.exit(main())
