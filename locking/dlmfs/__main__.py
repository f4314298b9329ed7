import sys

from .fs import main

sys.exit(main())
