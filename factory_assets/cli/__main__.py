"""``python -m factory_assets.cli`` is ``factory-assets`` (how `up` starts its services)."""
import sys

from factory_assets.cli import main

sys.exit(main())
