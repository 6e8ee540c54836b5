"""Run the djasync chaos harness: ``python chaos/run.py [--seed N] [--jobs N] [--duration S]
[--short] [--report PATH] [--keep]``. Exit status 0 when every invariant held.

See chaos/harness.py for what it does and chaos/checker.py for what it checks.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "tools"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from chaos.harness import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
