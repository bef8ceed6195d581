"""The test suite executes every notebook (nbmake) in its quick setting: two targets, one
episode, two training steps, in a fresh study folder."""

import os
import tempfile

os.environ.setdefault("CDFSL_NOTEBOOK_QUICK", tempfile.mkdtemp(prefix="cdfsl-notebooks-"))
