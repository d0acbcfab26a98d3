"""``python -m pf_sweep.data prepare | convert | info NAME --data-dir DIR``."""

import sys

from pf_sweep.data.prepare import main

sys.exit(main())
