import sys

from jaxft.cli import main

sys.exit(main())
