"""Where the repository and the shared data are."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
