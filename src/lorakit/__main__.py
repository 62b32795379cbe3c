import sys

from lorakit.cli import main

sys.exit(main())
