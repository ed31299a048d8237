import sys

from tropd.cli import main

sys.exit(main())
